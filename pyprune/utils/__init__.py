"""Small helpers shared across pyprune (crash-safe file writes)."""
