"""The model side: search spaces, candidate blocks, mixed and slimmable layers, the supernet, `Arch` (never imports `nas`)."""
