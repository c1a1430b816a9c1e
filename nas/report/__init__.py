"""What a person reads: plots saved beside reports, and the W&B extras."""
