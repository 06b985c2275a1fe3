"""Plain text out of documents: plain text, Markdown, HTML and PDF.

Pure functions of their arguments, defined at module level, so that `CpuPool` can run them in a worker
process (parsing is CPU-bound and pure Python: on the event loop it would stall every request).
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.token import Token

PLAIN = "text/plain"
MARKDOWN = "text/markdown"
HTML = "text/html"
PDF = "application/pdf"
SUPPORTED = (PLAIN, MARKDOWN, HTML, PDF)
DEFAULT_MAX_CHARS = 200_000

_MEDIA_TYPES = {
    "text/x-markdown": MARKDOWN,
    "application/xhtml+xml": HTML,
    "application/x-pdf": PDF,
    "application/json": PLAIN,
    "application/xml": PLAIN,
    "application/yaml": PLAIN,
    "application/x-yaml": PLAIN,
}
# Says nothing about the content: the extension and the bytes decide.
_UNINFORMATIVE = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/unknown"})
_EXTENSIONS = {
    **dict.fromkeys((".md", ".markdown", ".mdown", ".mkd"), MARKDOWN),
    **dict.fromkeys((".html", ".htm", ".xhtml"), HTML),
    ".pdf": PDF,
    **dict.fromkeys((".txt", ".text", ".log", ".csv", ".tsv", ".json", ".yaml", ".yml", ".xml", ".rst"), PLAIN),
}
# Common binary formats, only to name them in the refusal.
_BINARY_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"PK\x03\x04", "a ZIP archive (docx, xlsx, odt, ...)"),
    (b"\x1f\x8b", "application/gzip"),
    (b"\x7fELF", "an executable"),
)
_SNIFF = 1024


class DocumentError(ValueError):
    """The input cannot be read as a document: unsupported type, binary data, or a corrupt file."""


@dataclass(frozen=True)
class ExtractedText:
    text: str
    media_type: str  # one of SUPPORTED: what the input was parsed as
    pages: int | None  # the PDF's page count; None for formats without pages
    truncated: bool  # True when the text was cut at max_chars
    chars: int  # len(text)


def extract_text(
    data: bytes, media_type: str | None = None, filename: str | None = None, max_chars: int = DEFAULT_MAX_CHARS
) -> ExtractedText:
    """The text of a document, at most `max_chars` characters. Raises `DocumentError`."""
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    kind = detect_media_type(data, media_type, filename)
    if kind == PDF:
        return _pdf_text(data, max_chars)
    source = _decode(data)
    if kind == HTML:
        text = html_to_text(source)
    elif kind == MARKDOWN:
        text = markdown_to_text(source)
    else:
        text = source.replace("\r\n", "\n").replace("\r", "\n")
    return _result(text, kind, None, max_chars)


def extract_text_base64(
    content: str, media_type: str | None = None, filename: str | None = None, max_chars: int = DEFAULT_MAX_CHARS
) -> ExtractedText:
    """`extract_text` for base64 input (tool arguments): decoding megabytes is CPU work too."""
    try:
        data = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise DocumentError("content_base64 is not valid base64") from None
    return extract_text(data, media_type, filename, max_chars)


def detect_media_type(data: bytes, media_type: str | None, filename: str | None) -> str:
    """Declared media type first, then the file extension, then the bytes themselves."""
    declared = (media_type or "").split(";", 1)[0].strip().lower()
    if declared not in _UNINFORMATIVE:
        if declared in SUPPORTED:
            return declared
        if declared in _MEDIA_TYPES:
            return _MEDIA_TYPES[declared]
        if declared.startswith("text/"):
            return PLAIN
        raise DocumentError(f"unsupported media type {declared!r}; supported: {', '.join(SUPPORTED)}")
    if filename:
        by_extension = _EXTENSIONS.get(PurePath(filename).suffix.lower())
        if by_extension:
            return by_extension
    head = data[:_SNIFF]
    for magic, name in _BINARY_MAGIC:
        if head.startswith(magic):
            raise DocumentError(f"unsupported document type: {name}; supported: {', '.join(SUPPORTED)}")
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()  # a BOM, blank lines
    if start.startswith(b"%pdf-"):
        return PDF
    if start.startswith((b"<!doctype html", b"<html")):
        return HTML
    return PLAIN


def _decode(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    sample = data[:8192]
    if b"\x00" in sample:
        raise DocumentError("the content is binary, not text; supported: " + ", ".join(SUPPORTED))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    controls = sum(1 for byte in sample if byte < 0x20 and byte not in b"\t\n\r\f")
    if controls > len(sample) // 20:
        raise DocumentError("the content is binary, not text; supported: " + ", ".join(SUPPORTED))
    return data.decode("cp1252", errors="replace")  # not UTF-8 but text: the usual legacy encoding


def _result(text: str, media_type: str, pages: int | None, max_chars: int) -> ExtractedText:
    truncated = len(text) > max_chars
    if truncated:
        text = text[:max_chars]
    return ExtractedText(text=text, media_type=media_type, pages=pages, truncated=truncated, chars=len(text))


# --- PDF ---------------------------------------------------------------------------------------------


def _pdf_text(data: bytes, max_chars: int) -> ExtractedText:
    import pypdf  # imported on first use: the CPU pool's fork server preloads it for its workers

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError("the PDF is encrypted with a password")
        count = len(reader.pages)
        if count == 0:
            raise DocumentError("the PDF has no pages")
        texts: list[str] = []
        size = 0
        for page in reader.pages:  # page by page, stopping once the cap is reached
            text = page.extract_text().strip()
            texts.append(text)
            size += len(text) + 2
            if size > max_chars:
                break
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises many types on malformed input (PdfReadError, KeyError, ...)
        raise DocumentError(f"corrupt or unreadable PDF: {type(exc).__name__}: {exc}") from None
    return _result("\n\n".join(texts), PDF, count, max_chars)


# --- HTML --------------------------------------------------------------------------------------------

_SKIPPED = frozenset({"script", "style", "noscript", "template", "svg", "iframe", "object"})
_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "caption", "dd", "details", "div", "dl", "dt",
        "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
        "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "title", "tr", "ul",
    }
)  # fmt: skip
_CELLS = frozenset({"td", "th"})
# Blocks whose end adds no blank line: void elements, and list items and rows, which stay together.
_TIGHT = frozenset({"br", "hr", "li", "tr", "dt", "dd"})
_SPACES = re.compile(r"\s+")
_BLANK_RUNS = re.compile(r"\n{3,}")
_PRE_NEWLINE = "\ue000"  # a private-use character


class _HtmlText(HTMLParser):
    """Collects text: drops script and style, turns block elements into line breaks, decodes entities."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._pre = 0
        self._cell = False
        self._pre_start = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self._skip += 1
            return
        if tag == "pre":
            self._pre += 1
            self._pre_start = True
        if tag == "tr":
            self._cell = False
        if tag in _BLOCKS:
            self.parts.append("\n")
            if tag == "li":
                self.parts.append("- ")
        elif tag in _CELLS:
            if self._cell:
                self.parts.append(" | ")
            self._cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skip = max(0, self._skip - 1)
            return
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in _BLOCKS and tag not in _TIGHT:
            self.parts.append("\n")
        if tag == "tr":
            self._cell = False

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._pre_start:  # as browsers do, a line break right after <pre> is not content
            self._pre_start = False
            data = data.removeprefix("\n")
        # Preformatted line breaks are hidden from _tidy(), which would strip the code's indentation.
        self.parts.append(data.replace("\n", _PRE_NEWLINE) if self._pre else _SPACES.sub(" ", data))


def html_to_text(source: str) -> str:
    parser = _HtmlText()
    parser.feed(source)
    parser.close()
    lines = [line.strip() for line in "".join(parser.parts).split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip().replace(_PRE_NEWLINE, "\n")


# --- Markdown ----------------------------------------------------------------------------------------

_BLOCK_ENDS = frozenset(
    {"paragraph_close", "heading_close", "table_close", "fence", "code_block", "html_block", "bullet_list_close",
     "ordered_list_close"}
)  # fmt: skip


def markdown_to_text(source: str) -> str:
    """Rendered as plain text: markup dropped; headings, list items (with a marker), code and table
    rows kept as lines."""
    blocks: list[str] = []
    lists: list[bool] = []  # the open lists, innermost last: True if ordered
    prefix = ""
    row: list[str] | None = None
    for token in _markdown_parser().parse(source):
        kind = token.type
        if kind in ("bullet_list_open", "ordered_list_open"):
            lists.append(kind == "ordered_list_open")
        elif kind in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif kind == "list_item_open":
            marker = f"{token.info}." if lists and lists[-1] else "-"
            prefix = "  " * (len(lists) - 1) + marker + " "
        elif kind == "tr_open":
            row = []
        elif kind == "tr_close" and row is not None:
            blocks.append(" | ".join(row))
            row = None
        elif kind == "inline":
            text = _inline_text(token.children or [])
            if row is not None:
                row.append(text)
            else:
                blocks.append(prefix + text)
                prefix = ""
        elif kind in ("fence", "code_block", "html_block"):
            text = token.content.rstrip("\n") if kind != "html_block" else html_to_text(token.content)
            blocks.append(prefix + text)
            prefix = ""
        if kind in _BLOCK_ENDS and not lists:
            blocks.append("")  # a blank line between top-level blocks; list items stay together
    return _BLANK_RUNS.sub("\n\n", "\n".join(blocks)).strip()


@functools.cache
def _markdown_parser() -> MarkdownIt:
    """Made on first use: importing markdown-it is start-up time a server that reads no document need not spend."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"])


def _inline_text(children: list[Token]) -> str:
    parts: list[str] = []
    for child in children:
        if child.type in ("text", "code_inline", "image"):  # an image's content is its alt text
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append("\n")
    return "".join(parts)
