"""A provider's credential kept out of what reaches the client, in the forms an upstream that
echoes its request shows it in.

The forms: as sent; JSON-escaped, any character of it as `\\uXXXX` (hex in either case) or as a
short escape (`\\"`, `\\\\`, `\\/`), so Python's ASCII-only JSON and wholly escaped copies too;
percent-encoded; and base64 (standard or URL-safe) at any alignment inside a longer base64 text
(a `Basic` pair, an encoded dump of the request): there, every character that depends on the
credential's bytes alone is replaced, the one or two at each end that mix in a neighbour's bits
are left. Everything is replaced by `[redacted]`.

A successful answer is scanned only for a credential of at least `MIN_SCANNED_CHARS` characters:
a shorter one is a placeholder such as vLLM's `EMPTY`, which ordinary text contains. Error bodies,
headers and relayed messages are scanned for any credential. The scan runs only for providers
with a credential; `gateway bench redaction` measures it.
"""

from __future__ import annotations

import base64
import re
from typing import overload
from urllib.parse import quote

REDACTED = b"[redacted]"
MIN_SCANNED_CHARS = 8
# Short JSON escapes of the characters that have one besides `\uXXXX`.
_SHORT_ESCAPES = {'"': b'\\\\"', "\\": b"\\\\\\\\", "/": b"\\\\/"}


class Redactor:
    """Replaces every form of one credential in bytes, text and streams."""

    def __init__(self, secret: str) -> None:
        """Build the forms of `secret` once (a non-empty credential)."""
        raw = secret.encode("utf-8", "surrogateescape")
        self.scans_answers = len(secret) >= MIN_SCANNED_CHARS
        literal = {raw, quote(secret, safe="").encode()}
        literal.update(_base64_cores(raw))
        # Longest first: a form inside another is replaced as part of the longer one.
        self._literal = sorted((form for form in literal if form), key=len, reverse=True)
        self._escaped = re.compile(b"".join(_escaped_character(char) for char in secret))
        # The bytes that open an escape: without them the escaped pattern cannot match anything
        # the literal forms did not.
        self._escape_openers = (b"\\u", *(b"\\" + c.encode() for c in '"\\/' if c in secret))
        self._longest = max(len(self._literal[0]), 12 * len(secret))

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
        for form in self._literal:
            if form in data:
                data = data.replace(form, REDACTED)
        if any(opener in data for opener in self._escape_openers) and self._escaped.search(data):
            data = type(data)(self._escaped.sub(REDACTED, data))
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
    whole: no form holds a line break, so none spans it. Otherwise the bytes after the chunk's
    last line break that could open a form are held for the next chunk (at most the longest
    form's length), so an event is never held back, only part of a line."""

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
        keep_from = max(data.rfind(b"\n") + 1, len(data) - self._redactor.longest_form)
        self._held = data[keep_from:]
        return data[:keep_from]

    def flush(self) -> bytes:
        """What is still held, at the stream's end."""
        held, self._held = self._held, b""
        return held


def _escaped_character(char: str) -> bytes:
    """A pattern for one character of the credential as sent or JSON-escaped."""
    options = [re.escape(char.encode("utf-8", "surrogateescape"))]
    if char in _SHORT_ESCAPES:
        options.append(_SHORT_ESCAPES[char])
    code = ord(char)
    units = [code] if code < 0x10000 else _surrogates(code)
    options.append(b"".join(b"\\\\u" + _hex_either_case(unit) for unit in units))
    return b"(?:" + b"|".join(options) + b")"


def _surrogates(code: int) -> list[int]:
    offset = code - 0x10000
    return [0xD800 + (offset >> 10), 0xDC00 + (offset & 0x3FF)]


def _hex_either_case(unit: int) -> bytes:
    """Four hex digits of `unit`, each letter in either case."""
    return b"".join(
        f"[{digit}{digit.upper()}]".encode() if digit.isalpha() else digit.encode()
        for digit in f"{unit:04x}"
    )


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
