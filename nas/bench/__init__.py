"""The suites of `nas-bench`: memory and step time, search quality, slimmable widths."""
