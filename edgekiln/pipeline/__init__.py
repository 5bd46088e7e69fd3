"""edgekiln.pipeline."""
