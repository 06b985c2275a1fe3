"""Layer 1: know the GPUs (inventory, topology), plan what fits, keep CPU work off the event loop."""
