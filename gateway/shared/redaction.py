"""A provider's credential kept out of what reaches the client, in the forms an upstream that
echoes its request shows it in.

The forms: as sent; as JSON encoders write it (minimal escapes; ASCII-only with `\\uXXXX` in lower
or upper case hex; `<`, `>`, `&` escaped as Go does; `/` as `\\/`; and every character escaped);
percent-encoded; and base64 (standard or URL-safe) at any alignment inside a longer base64 text
(a `Basic` pair, an encoded dump of the request): there, every character that depends on the
credential's bytes alone is replaced, the one or two at each end that mix in a neighbour's bits
are left. Each is replaced by `[redacted]`. Each form is a literal found at memchr speed (a
pattern for arbitrary mixtures of escapes scanned 20 times slower); an upstream that means to
leak its own credential can always encode it some other way, so the forms are those an honest
upstream echoing its request produces.

A successful answer is scanned only for a credential of at least `MIN_SCANNED_CHARS` characters:
a shorter one is a placeholder such as vLLM's `EMPTY`, which ordinary text contains. Error bodies,
headers and relayed messages are scanned for any credential. The scan runs only for providers
with a credential; `gateway bench redaction` measures it.
"""

from __future__ import annotations

import base64
import json
import re
from typing import overload
from urllib.parse import quote

REDACTED = b"[redacted]"
MIN_SCANNED_CHARS = 8
_UPPER_HEX = re.compile(rb"(?<=\\u)[0-9a-f]{4}")


class Redactor:
    """Replaces every form of one credential in bytes, text and streams."""

    def __init__(self, secret: str) -> None:
        """Build the forms of `secret` once (a non-empty credential)."""
        raw = secret.encode("utf-8", "surrogateescape")
        self.scans_answers = len(secret) >= MIN_SCANNED_CHARS
        forms = {raw, quote(secret, safe="").encode(), *_json_forms(secret), *_base64_cores(raw)}
        # Longest first: a form inside another is replaced as part of the longer one.
        ordered = sorted((form for form in forms if form), key=len, reverse=True)
        # Forms with a `\u` escape are looked for only in data that has one.
        self._plain = [form for form in ordered if b"\\u" not in form]
        self._escaped = [form for form in ordered if b"\\u" in form]
        self._longest = len(ordered[0])

    @property
    def longest_form(self) -> int:
        """The most bytes one form of the credential can take."""
        return self._longest

    @overload
    def redact(self, data: bytes) -> bytes: ...
    @overload
    def redact(self, data: bytes | bytearray) -> bytes | bytearray: ...
    def redact(self, data: bytes | bytearray) -> bytes | bytearray:
        """`data` with every form of the credential replaced (`data` itself, uncopied, when it
        holds none)."""
        for form in self._plain:
            if form in data:
                data = data.replace(form, REDACTED)
        if self._escaped and b"\\u" in data:
            for form in self._escaped:
                if form in data:
                    data = data.replace(form, REDACTED)
        return data

    def redact_text(self, value: str) -> str:
        """`value` (a header value, a relayed message) with every form replaced."""
        encoded = value.encode("utf-8", "surrogateescape")
        redacted = self.redact(encoded)
        return value if redacted == encoded else redacted.decode("utf-8", "surrogateescape")

    def stream(self) -> StreamRedactor:
        """A redactor for one stream's chunks."""
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts a stream chunk by chunk. A chunk that ends a line (every SSE event does) goes out
    whole: no form holds a line break, so none spans it. Otherwise the end of the chunk's
    unfinished line (at most one byte less than the longest form) waits for the next chunk, so
    a finished event is never held back, only part of a line."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The redacted bytes that can go out now."""
        data = self._held + chunk if self._held else chunk
        data = self._redactor.redact(data)
        if data.endswith(b"\n") or not data:
            self._held = b""
            return data
        keep_from = max(data.rfind(b"\n") + 1, len(data) - self._redactor.longest_form + 1)
        self._held = data[keep_from:]
        return data[:keep_from]

    def flush(self) -> bytes:
        """What is still held, at the stream's end."""
        held, self._held = self._held, b""
        return held


def _json_forms(secret: str) -> set[bytes]:
    """The credential inside a JSON string, as common encoders escape it."""
    minimal = json.dumps(secret, ensure_ascii=False)[1:-1].encode("utf-8", "surrogateescape")
    ascii_only = json.dumps(secret)[1:-1].encode()
    html_safe = minimal.replace(b"<", b"\\u003c").replace(b">", b"\\u003e")
    html_safe = html_safe.replace(b"&", b"\\u0026")
    every = "".join(f"\\u{unit:04x}" for unit in _utf16_units(secret)).encode()
    forms = {minimal, ascii_only, html_safe, every}
    forms |= {_UPPER_HEX.sub(lambda hex_escape: hex_escape.group().upper(), form) for form in forms}
    forms |= {form.replace(b"/", b"\\/") for form in forms}
    return forms


def _utf16_units(text: str) -> list[int]:
    """The UTF-16 code units of `text` (a surrogate pair beyond the BMP), as JSON escapes it."""
    encoded = text.encode("utf-16-be", "surrogatepass")
    return [int.from_bytes(encoded[at : at + 2], "big") for at in range(0, len(encoded), 2)]


def _base64_cores(raw: bytes) -> set[bytes]:
    """The base64 characters (both alphabets) that depend on `raw`'s bytes alone, for `raw`
    starting at each of the three alignments inside a longer base64 text."""
    cores: set[bytes] = set()
    for lead in range(3):
        encoded = base64.b64encode(bytes(lead) + raw)
        # Characters covering the lead bytes (and a partial one) come first; the last group
        # mixes in what follows unless `raw` ends on a group boundary.
        start = -(-lead * 4 // 3)  # ceil(lead * 4 / 3): characters touching a lead byte
        end = ((lead + len(raw)) * 4) // 3  # characters wholly within the bytes so far
        core = encoded[start:end]
        if len(core) >= MIN_SCANNED_CHARS:
            cores.add(core)
            cores.add(core.translate(_URL_SAFE))
    return cores


_URL_SAFE = bytes.maketrans(b"+/", b"-_")
