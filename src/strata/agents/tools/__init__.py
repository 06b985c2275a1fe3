"""Tools an agent can call: a registry plus built-ins (http_fetch, python), Python functions, MCP."""
