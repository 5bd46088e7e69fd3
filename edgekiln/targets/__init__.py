"""edgekiln.targets."""
