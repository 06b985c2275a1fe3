"""Layer 3: agent specs, the durable run engine, guards, and tools."""
