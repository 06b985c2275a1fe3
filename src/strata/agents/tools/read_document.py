"""The `read_document` built-in: the text of a plain-text, Markdown, HTML or PDF document.

The document comes inline (base64) or as a path under the configured directories. A path is resolved
(symlinks followed) before it is judged, and the file actually opened is judged again, so neither `..`
nor a symlink (even one swapped in between check and open) reaches outside. Parsing is CPU-bound and
runs in the CPU pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata.agents.tools.base import Tool, ToolContext, ToolError, ToolResult, ToolRisk, ToolSpec
from strata.compute.documents import DEFAULT_MAX_CHARS, DocumentError, ExtractedText, extract_text, extract_text_base64
from strata.compute.offload import CpuPool, CpuPoolBusy, CpuPoolError, CpuPoolTimeout
from strata.config import ReadDocumentConfig

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
_ARGUMENTS = ("path", "content_base64", "media_type", "filename", "max_chars")


@dataclass(frozen=True)
class _Request:
    path: str | None
    content_base64: str | None
    media_type: str | None
    filename: str | None
    max_chars: int


class ReadDocumentTool(Tool):
    """Reads by path (allowed directories only) or inline content; refusals and failures raise `ToolError`."""

    def __init__(
        self,
        pool: CpuPool,
        allowed_dirs: Sequence[str | os.PathLike[str]] = (),
        *,
        timeout_s: float = 60.0,
        max_chars: int = DEFAULT_MAX_CHARS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._pool = pool
        # Resolved once, so that comparisons are between real paths on both sides.
        self._allowed = tuple(Path(directory).resolve() for directory in allowed_dirs)
        self._max_chars = max_chars
        self._max_bytes = max_bytes
        dirs = ", ".join(str(directory) for directory in self._allowed)
        where = f"`path` for a file under {dirs} (a relative path starts at the first), or " if dirs else ""
        self.spec = ToolSpec(
            name="read_document",
            description=(
                "Read a document (plain text, Markdown, HTML or PDF) and return its text, at most "
                f"{max_chars} characters. Pass {where}`content_base64` with the document's bytes "
                "(and `media_type` or `filename` if known)."
            ),
            parameters=_parameters(max_chars),
            timeout_s=timeout_s,
            risk=ToolRisk.LOW,
        )

    @classmethod
    def from_config(cls, config: ReadDocumentConfig, pool: CpuPool) -> ReadDocumentTool:
        return cls(pool, config.allowed_dirs, timeout_s=config.timeout_s, max_chars=config.max_chars)

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        request = self._parse_arguments(arguments)
        budget = min(self.spec.timeout_s, context.timeout_s)
        try:
            if request.path is not None:
                data, filename = await asyncio.to_thread(self._read_file, request.path)
                result = await self._pool.run(
                    extract_text, data, request.media_type, request.filename or filename, request.max_chars,
                    timeout_s=budget,
                )  # fmt: skip
            else:
                assert request.content_base64 is not None
                if len(request.content_base64) > (self._max_bytes + 2) // 3 * 4:
                    raise ToolError(f"refused: the document is larger than {self._max_bytes} bytes")
                result = await self._pool.run(
                    extract_text_base64, request.content_base64, request.media_type, request.filename,
                    request.max_chars, timeout_s=budget,
                )  # fmt: skip
        except DocumentError as exc:
            raise ToolError(f"cannot read the document: {exc}") from None
        except CpuPoolBusy:
            raise ToolError("the document parser is busy; try again shortly") from None
        except CpuPoolTimeout:
            raise ToolError(f"parsing the document took longer than {budget:g}s") from None
        except CpuPoolError as exc:
            raise ToolError(f"the document parser failed: {exc}") from None
        return ToolResult(
            content=_header(result) + "\n\n" + result.text,
            metadata={
                "media_type": result.media_type,
                "pages": result.pages,
                "chars": result.chars,
                "truncated": result.truncated,
            },
        )

    def _parse_arguments(self, arguments: dict[str, Any]) -> _Request:
        unknown = set(arguments) - set(_ARGUMENTS)
        if unknown:
            raise ToolError(f"unknown argument(s) {sorted(unknown)}; read_document takes {', '.join(_ARGUMENTS)}")
        values: dict[str, str | None] = {}
        for name in ("path", "content_base64", "media_type", "filename"):
            value = arguments.get(name)
            if value is not None and not isinstance(value, str):
                raise ToolError(f"{name} must be a string")
            values[name] = value or None
        if (values["path"] is None) == (values["content_base64"] is None):
            raise ToolError("pass exactly one of path or content_base64")
        max_chars = arguments.get("max_chars", self._max_chars)
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise ToolError("max_chars must be a positive integer")
        return _Request(
            path=values["path"],
            content_base64=values["content_base64"],
            media_type=values["media_type"],
            filename=values["filename"],
            max_chars=min(max_chars, self._max_chars),
        )

    def _read_file(self, raw: str) -> tuple[bytes, str]:
        """Blocking file I/O: runs in a thread. Returns the bytes and the real file name."""
        if not self._allowed:
            raise ToolError("reading files by path is not enabled here; pass content_base64 instead")
        if "\0" in raw:
            raise ToolError("path contains a NUL character")
        candidate = Path(raw)
        if not candidate.is_absolute():
            candidate = self._allowed[0] / candidate
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise ToolError(f"cannot resolve path {raw!r}") from None
        if not self._is_allowed(resolved):
            raise ToolError(f"refused: {raw!r} is outside the directories this tool may read")
        try:
            # O_NOFOLLOW: the last component cannot have become a symlink since it was resolved;
            # O_NONBLOCK: a FIFO cannot hang the open.
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ToolError(f"no such file: {raw!r}") from None
        except PermissionError:
            raise ToolError(f"permission denied: {raw!r}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ToolError(f"refused: {raw!r} changed into a symlink") from None
            raise ToolError(f"cannot open {raw!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ToolError(f"{raw!r} is not a regular file")
            opened = _opened_path(fd)
            if opened is not None and not self._is_allowed(opened):  # a directory above was swapped
                raise ToolError(f"refused: {raw!r} is outside the directories this tool may read")
            if info.st_size > self._max_bytes:
                raise ToolError(f"refused: {raw!r} is larger than {self._max_bytes} bytes")
            with os.fdopen(fd, "rb", closefd=False) as file:
                data = file.read(self._max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > self._max_bytes:
            raise ToolError(f"refused: {raw!r} is larger than {self._max_bytes} bytes")
        return data, resolved.name

    def _is_allowed(self, path: Path) -> bool:
        return any(path.is_relative_to(directory) for directory in self._allowed)


def _opened_path(fd: int) -> Path | None:
    """Where the open file really is, from the kernel (Linux); None where that cannot be asked."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _header(result: ExtractedText) -> str:
    pages = "n/a" if result.pages is None else str(result.pages)
    truncated = f"yes (cut at {result.chars} characters)" if result.truncated else "no"
    return f"[document: type={result.media_type}; pages={pages}; chars={result.chars}; truncated={truncated}]"


def _parameters(max_chars: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Path of a file in an allowed directory."},
            "content_base64": {"type": "string", "description": "The document's bytes, base64-encoded."},
            "media_type": {
                "type": "string",
                "description": "text/plain, text/markdown, text/html or application/pdf; guessed if left out.",
            },
            "filename": {"type": "string", "description": "The document's file name; its extension helps guess."},
            "max_chars": {"type": "integer", "minimum": 1, "maximum": max_chars, "default": max_chars},
        },
        "additionalProperties": False,
    }
