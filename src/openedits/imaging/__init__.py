"""Image handling: safe fetching, decoding with limits, masks and grids."""
