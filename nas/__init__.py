"""hwnas, the search side: apps, latency, strategies, data, export and reports (see docs/layout.md)."""
