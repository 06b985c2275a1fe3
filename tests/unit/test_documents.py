"""Text out of documents built here, byte by byte: plain text, Markdown, HTML and a real PDF."""

from __future__ import annotations

import base64
import pickle

import pypdf
import pytest

from strata.compute.documents import (
    HTML,
    MARKDOWN,
    PDF,
    PLAIN,
    DocumentError,
    ExtractedText,
    detect_media_type,
    extract_text,
    extract_text_base64,
)


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF, written by hand: one Helvetica text line per string, correct xref offsets."""
    count = len(pages)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids ["
        + b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(count))
        + b"] /Count %d >>" % count,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, lines in enumerate(pages):
        ops = [b"BT", b"/F1 12 Tf", b"14 TL", b"72 720 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")
            ops.append(b"(" + escaped + b") Tj T*")
        ops.append(b"ET")
        stream = b"\n".join(ops)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (5 + 2 * i)
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# --- plain text ------------------------------------------------------------------------------------


def test_plain_text_is_returned_as_is_with_normalised_line_breaks() -> None:
    result = extract_text("héllo\r\nwörld\n".encode(), "text/plain", None)
    assert result == ExtractedText(text="héllo\nwörld\n", media_type=PLAIN, pages=None, truncated=False, chars=12)


def test_plain_text_in_a_legacy_encoding_is_still_read() -> None:
    result = extract_text("café".encode("cp1252"), None, "notes.txt")
    assert result.text == "café"


def test_truncation_cuts_at_max_chars_and_says_so() -> None:
    result = extract_text(b"x" * 100, PLAIN, None, 10)
    assert (result.text, result.chars, result.truncated) == ("x" * 10, 10, True)
    exact = extract_text(b"x" * 10, PLAIN, None, 10)
    assert (exact.chars, exact.truncated) == (10, False)


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError):
        extract_text(b"x", PLAIN, None, 0)


# --- Markdown --------------------------------------------------------------------------------------

MARKDOWN_SOURCE = """# Install &amp; run

Some *emphasis*, **strong**, `inline code` and a [link](https://example.com) ![a diagram](d.png).

- first item
- second item
  1. nested one
  2. nested two

```python
def main():
    return 42
```

| name | value |
|------|-------|
| a    | 1     |
"""


def test_markdown_drops_markup_and_keeps_headings_lists_and_code() -> None:
    result = extract_text(MARKDOWN_SOURCE.encode(), None, "README.md")
    assert result.media_type == MARKDOWN
    text = result.text
    assert text.splitlines()[0] == "Install & run"
    assert "Some emphasis, strong, inline code and a link a diagram." in text
    assert "- first item\n- second item\n  1. nested one\n  2. nested two" in text
    assert "def main():\n    return 42" in text
    assert "name | value\na | 1" in text
    for markup in ("#", "*", "`", "](", "https://example.com", "|---"):
        assert markup not in text, markup


# --- HTML ------------------------------------------------------------------------------------------

HTML_SOURCE = """<!DOCTYPE html>
<html><head><title>Report &amp; notes</title>
<style>body { color: red; } .hidden { display: none }</style>
<script>var secret = "<p>not text</p>"; if (a < b) { alert(1) }</script>
</head>
<body>
  <h1>Quarterly&nbsp;results</h1>
  <p>Revenue    grew
     by 5&#37; &mdash; &lt;strong&gt; as expected &copy;</p>
  <ul><li>alpha</li><li>beta</li></ul>
  <pre>
def f():
    return 1</pre>
  <noscript>enable javascript</noscript>
  <table><tr><th>k</th><th>v</th></tr><tr><td>a</td><td>1</td></tr></table>
  line<br>break
</body></html>
"""


def test_html_drops_script_and_style_keeps_blocks_and_decodes_entities() -> None:
    result = extract_text(HTML_SOURCE.encode(), "text/html; charset=utf-8", None)
    assert result.media_type == HTML
    lines = result.text.splitlines()
    assert lines[0] == "Report & notes"
    assert "Quarterly results" in lines
    assert "Revenue grew by 5% — <strong> as expected ©" in lines
    assert "- alpha\n- beta" in result.text
    assert "def f():\n    return 1" in result.text
    assert "k | v\na | 1" in result.text
    assert "line\nbreak" in result.text
    for hidden in ("secret", "not text", "color", "alert", "javascript", "<p>", "&amp;", "&nbsp;"):
        assert hidden not in result.text, hidden


# --- PDF -------------------------------------------------------------------------------------------


def test_the_handmade_pdf_is_a_real_pdf() -> None:
    reader = pypdf.PdfReader(__import__("io").BytesIO(make_pdf([["one"], ["two"]])))
    assert len(reader.pages) == 2


def test_pdf_text_page_by_page() -> None:
    data = make_pdf([["Hello PDF world", "second line (with parens)"], ["Page two text"]])
    result = extract_text(data, None, None)
    assert result.media_type == PDF
    assert result.pages == 2
    assert not result.truncated
    assert "Hello PDF world" in result.text
    assert "second line (with parens)" in result.text
    assert result.text.index("Hello PDF world") < result.text.index("Page two text")
    assert result.chars == len(result.text)


def test_pdf_truncation_stops_early_and_reports_every_page() -> None:
    data = make_pdf([[f"page {n} " + "word " * 40] for n in range(30)])
    result = extract_text(data, PDF, "big.pdf", 500)
    assert result.truncated
    assert result.chars == 500
    assert result.pages == 30
    assert "page 0" in result.text
    assert "page 29" not in result.text


def test_corrupt_pdf_is_a_document_error() -> None:
    with pytest.raises(DocumentError, match="PDF"):
        extract_text(b"%PDF-1.7\n" + b"\x00\x13garbage that is not a pdf body" * 50, None, "broken.pdf")


def test_truncated_pdf_is_a_document_error() -> None:
    data = make_pdf([["Hello"]])
    with pytest.raises(DocumentError):
        extract_text(data[:40], PDF, None)


# --- detection and refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "media_type", "filename", "expected"),
    [
        (b"%PDF-1.4 ...", None, None, PDF),
        (b"\n  <!DOCTYPE html><p>x", None, None, HTML),
        (b"<html><body>x", "application/octet-stream", None, HTML),
        (b"# title", None, "a.MD", MARKDOWN),
        (b"<p>x</p>", None, "page.htm", HTML),
        (b"\n%PDF-1.7\n...", None, None, PDF),
        (b"just words", None, None, PLAIN),
        (b"a note on the %PDF-1.7 header", None, None, PLAIN),
        (b"{}", "application/json", None, PLAIN),
        (b"a,b", "text/csv", None, PLAIN),
        (b"<p>declared wins</p>", "text/plain", "x.html", PLAIN),
    ],
)
def test_type_detection(data: bytes, media_type: str | None, filename: str | None, expected: str) -> None:
    assert detect_media_type(data, media_type, filename) == expected


def test_unknown_binary_is_a_document_error() -> None:
    with pytest.raises(DocumentError, match="binary"):
        extract_text(bytes(range(256)) * 8, None, None)


def test_known_binary_format_is_named_in_the_refusal() -> None:
    with pytest.raises(DocumentError, match="image/png"):
        extract_text(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, None, "picture")


def test_unsupported_declared_type_is_a_document_error() -> None:
    with pytest.raises(DocumentError, match="unsupported media type 'image/png'"):
        extract_text(b"whatever", "image/png", None)


def test_base64_input() -> None:
    encoded = base64.b64encode(b"<html><p>hi &amp; bye</p></html>").decode()
    assert extract_text_base64(encoded, None, None).text == "hi & bye"
    with pytest.raises(DocumentError, match="base64"):
        extract_text_base64("not base64!!", None, None)


def test_results_and_errors_survive_pickling() -> None:
    """They cross the process boundary of the CPU pool."""
    result = extract_text(b"text", PLAIN, None)
    assert pickle.loads(pickle.dumps(result)) == result
    error = pickle.loads(pickle.dumps(DocumentError("bad input")))
    assert isinstance(error, DocumentError)
    assert str(error) == "bad input"
