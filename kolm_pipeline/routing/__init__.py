"""Student routing at the capture endpoint: shadow comparisons and confidence-gated student answers."""
