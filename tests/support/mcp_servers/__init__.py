"""Small MCP servers written with the official SDK, launched as real processes by the MCP tool tests."""
