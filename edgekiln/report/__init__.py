"""edgekiln.report."""
