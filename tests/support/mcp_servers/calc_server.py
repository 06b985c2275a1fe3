"""An MCP server over stdio: `python -m tests.support.mcp_servers.calc_server`.

Its tools cover what the client must handle: a plain result, a tool error, a slow call, non-text content,
and a view of the server's own process (pid, environment) so tests can check isolation and clean-up.
While the file named by CALC_DOWN_PATH exists, the server exits at start (a server that cannot come back).
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent

server = MCPServer("calc", log_level="WARNING")

# A 1x1 transparent PNG: enough for the client to see an image block.
_PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def divide(a: float, b: float) -> float:
    """Divide a by b."""
    if b == 0:
        raise ToolError("cannot divide by zero")
    return a / b


@server.tool()
def record(note: str, ctx: Context) -> str:
    """Append the note and the caller's idempotency key to the file named by CALC_RECORD_PATH."""
    key = (ctx.request_context.meta or {}).get("strata/idempotency-key", "")
    with Path(os.environ["CALC_RECORD_PATH"]).open("a", encoding="utf-8") as file:
        file.write(f"{key}\t{note}\n")
    return f"recorded {note!r}"


@server.tool()
async def sleep(seconds: float) -> str:
    """Wait a while, then answer (a server that is slow to respond)."""
    await anyio.sleep(seconds)
    return "awake"


@server.tool()
def pixel() -> CallToolResult:
    """Return a caption and an image."""
    image = ImageContent(type="image", data=base64.b64encode(_PIXEL).decode(), mime_type="image/png")
    return CallToolResult(content=[TextContent(type="text", text="a single pixel"), image])


@server.tool()
def whoami() -> dict[str, object]:
    """This server's process id and the environment variables it can see."""
    return {"pid": os.getpid(), "env": dict(os.environ)}


if __name__ == "__main__":
    if os.environ.get("CALC_DOWN_PATH") and Path(os.environ["CALC_DOWN_PATH"]).exists():
        sys.exit("calc server: told to stay down")
    server.run("stdio")
