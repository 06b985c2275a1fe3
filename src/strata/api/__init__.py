"""Layer 4: the HTTP surface. Nothing imports `api`."""
