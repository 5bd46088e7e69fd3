"""edgekiln.exporters."""
