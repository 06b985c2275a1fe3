"""An MCP server over streamable HTTP: `python -m tests.support.mcp_servers.http_server PORT`.

Serves `http://127.0.0.1:PORT/mcp` until killed.
"""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("words", log_level="WARNING")


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def word_count(text: str) -> int:
    """Count the whitespace-separated words in the text."""
    return len(text.split())


if __name__ == "__main__":
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
