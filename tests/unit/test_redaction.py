"""The credential redactor: every echoed form replaced, streams split anywhere, nothing else."""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote

import pytest

from gateway.shared.redaction import REDACTED, Redactor

SECRET = 'sk-pa"ss/wo\\rd-é€😀-0123'


def every_escape(text: str) -> str:
    """Each UTF-16 unit of `text` as a JSON `\\u` escape."""
    encoded = text.encode("utf-16-be")
    return "".join(f"\\u{encoded[index : index + 2].hex()}" for index in range(0, len(encoded), 2))


def upper_hex(escaped: str) -> str:
    """The `\\u` escapes' hex digits in upper case."""
    return re.sub(r"(?<=\\u)[0-9a-f]{4}", lambda digits: digits.group().upper(), escaped)


@pytest.mark.parametrize(
    "form",
    [
        SECRET,
        json.dumps(SECRET)[1:-1],
        upper_hex(json.dumps(SECRET)[1:-1]),
        json.dumps(SECRET, ensure_ascii=False)[1:-1],
        json.dumps(SECRET)[1:-1].replace("/", "\\/"),
        every_escape(SECRET),
        upper_hex(every_escape(SECRET)),
        quote(SECRET, safe=""),
    ],
    ids=[
        "raw",
        "ascii-json",
        "ascii-json-upper",
        "json",
        "escaped-slash",
        "every",
        "every-upper",
        "percent",
    ],
)
def test_each_form_of_the_credential_is_replaced(form: str) -> None:
    """As sent, JSON-escaped as encoders write it (any hex case), or percent-encoded: replaced
    whole."""
    redacted = Redactor(SECRET).redact(b"before " + form.encode() + b" after")
    assert redacted == b"before " + REDACTED + b" after"


@pytest.mark.parametrize("lead", [b"", b"a", b"ab", b"abc"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_at_any_alignment_loses_the_credential(lead: bytes, encode: object) -> None:
    """Inside a longer base64 text at any offset, in either alphabet: the characters that
    carry the credential's bytes are gone, so it cannot be decoded back."""
    assert callable(encode)
    encoded = encode(lead + b"Bearer " + SECRET.encode() + b" trailing")
    redacted = Redactor(SECRET).redact(encoded)
    assert REDACTED in redacted
    remaining = redacted.replace(REDACTED, b"")
    assert len(remaining) <= len(encode(lead + b"Bearer  trailing")) + 4


def test_an_answer_without_the_credential_is_the_same_object() -> None:
    """Nothing to replace: the answer is handed back uncopied, bytes or bytearray."""
    redactor = Redactor(SECRET)
    body = bytearray(b'{"content": "nothing secret \\u00e9 here"}')
    assert redactor.redact(body) is body


def test_a_placeholder_credential_does_not_scan_answers() -> None:
    """A credential under 8 characters (vLLM's `EMPTY`) is no secret: answers are not scanned
    for it, though errors still are."""
    assert not Redactor("EMPTY").scans_answers
    assert Redactor(SECRET).scans_answers


def test_a_stream_split_at_every_byte_is_redacted() -> None:
    """The credential split across two chunks at any byte: redacted; whole lines go out at
    once, and the stream's bytes are otherwise unchanged."""
    event = b"data: " + json.dumps({"content": SECRET}).encode() + b"\n\n"
    expected = Redactor(SECRET).redact(event)
    assert REDACTED in expected
    for cut in range(1, len(event)):
        stream = Redactor(SECRET).stream()
        first = stream.feed(event[:cut])
        rest = stream.feed(event[cut:])
        assert first + rest + stream.flush() == expected
        assert stream.flush() == b""


def test_a_chunk_ending_a_line_is_never_held() -> None:
    """A chunk that ends with a line break goes out whole at once, even one naming the key."""
    stream = Redactor(SECRET).stream()
    assert stream.feed(b"data: {}\n\n") == b"data: {}\n\n"
    assert stream.feed(b"data: " + SECRET.encode() + b"\n\n") == b"data: " + REDACTED + b"\n\n"


def test_header_text_is_redacted() -> None:
    """A header value or relayed message: as text, every form replaced."""
    redactor = Redactor(SECRET)
    assert redactor.redact_text(f'attachment; filename="Bearer {SECRET}"') == (
        'attachment; filename="Bearer [redacted]"'
    )
    assert redactor.redact_text("nothing here") == "nothing here"
