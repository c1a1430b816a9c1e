"""The Hydra apps (`nas-search`, `nas-retrain`, `nas-lut`, `nas-bench`); `common` is the one place config becomes objects."""
