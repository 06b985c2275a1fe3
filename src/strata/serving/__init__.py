"""Layer 2: drive real inference servers (launched or remote) behind one OpenAI-compatible surface."""
