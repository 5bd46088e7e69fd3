"""edgekiln.models."""
