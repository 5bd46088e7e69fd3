"""File formats edgekiln reads and writes without the frameworks that made them."""
