"""Layer 5: logs now; traces and metrics join here."""
