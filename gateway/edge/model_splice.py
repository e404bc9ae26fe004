"""The request's `model` value spliced into the client's raw JSON, in time linear in its size.

Only the value's bytes change (big integers, key order, spacing and escapes stay as sent), and
no step walks the document in Python: the work is bytes searches, `translate`s and one orjson
parse of the document's bracket skeleton, so a body of a million keys or strings costs a few
passes over its bytes, not a Python step per token.

Why a search finds keys: in valid JSON a quote that follows `{`, `,` or whitespace and is followed
by `model"` and a colon opens a key named `model` (were it a string's closing quote, `model`
would stand bare outside a string; an escaped quote follows a backslash). So every match of
`_KEY` is a `model` key at some depth, in document order; which one is the top-level object's is
decided on the skeleton, where strings are gone and each such key is a marker.
"""

from __future__ import annotations

import re

import orjson

_SPACE = rb"[ \t\r\n]*"
_LETTERS = (
    (b"m", (b"\\u006d", b"\\u006D")),
    (b"o", (b"\\u006f", b"\\u006F")),
    (b"d", (b"\\u0064",)),
    (b"e", (b"\\u0065",)),
    (b"l", (b"\\u006c", b"\\u006C")),
)
# The key `model`, each letter literal or \u-escaped (every spelling a parser reads as `model`).
_ESCAPABLE_NAME = b"".join(
    b"(?:" + b"|".join(re.escape(form) for form in (letter, *escapes)) + b")"
    for letter, escapes in _LETTERS
)
# The common spelling first: a literal prefix the regex engine finds at `bytes.find` speed.
_PLAIN_KEY = re.compile(rb'"model"(?<=[{,\s]"model")' + _SPACE + b":" + _SPACE)
_KEY = re.compile(rb'(?<=[{,\s])"' + _ESCAPABLE_NAME + b'"' + _SPACE + b":" + _SPACE)
# An escape that may spell a letter of `model` (\u0060-\u006f).
_LETTER_ESCAPE = b"\\u006"
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR_END = re.compile(rb"[ \t\r\n,}\]]")
_STRUCTURE = re.compile(rb'["{}\[\]]')
# The skeleton: a model key becomes MARKER; then only brackets, quotes and markers are kept.
MARKER = b"\x00"  # a control byte: never in valid JSON outside an escape
_HIDDEN = b"\x01"
_SPACED_KEY = re.compile(rb'"model"[ \t\r\n]+:')
_NOT_SKELETON = bytes(byte for byte in range(256) if bytes([byte]) not in b'{}[]"\x00')
# The skeleton as JSON: every container an array, every marker a 0, commas between items.
_AS_ARRAYS = bytes.maketrans(b"{}\x00", b"[]0")
_COMMAS = ((b"][", b"],["), (b"]0", b"],0"), (b"0[", b"0,["), (b"00", b"0,0"), (b"00", b"0,0"))


def replace_model(
    raw: bytes, model: str, *, has_model: bool = True, span: tuple[int, int] | None = None
) -> bytes:
    """`raw` (a JSON object orjson accepted) with its top-level `model` value set to `model`.

    The value's bytes are replaced in place; when the key appears more than once the last one
    counts (as for the parser). An object without a top-level `model` (`has_model=False`, as
    its parse told) gains one at its end. `span`: the value's place, when already found.
    """
    if span is None and has_model:
        span = model_value_span(raw)
    value = orjson.dumps(model)
    if span is None:
        closing = raw.rstrip().rfind(b"}")
        separator = b"," if raw[:closing].rstrip()[-1:] != b"{" else b""
        return raw[:closing] + separator + b'"model":' + value + raw[closing:]
    start, end = span
    return raw[:start] + value + raw[end:]


def model_value_span(raw: bytes) -> tuple[int, int] | None:
    """Where the top-level `model` value of a JSON object that has one lies in `raw` (None when
    no `model` key is found at all). A lone `model` key is the top-level one; among several the
    skeleton tells which."""
    pattern = _KEY if _LETTER_ESCAPE in raw else _PLAIN_KEY
    first = pattern.search(raw)
    if first is None:
        return None
    start = first.end()
    if pattern.search(raw, start) is not None:
        starts = [match.end() for match in pattern.finditer(raw)]
        ordinal = _top_level_ordinal(raw, len(starts))
        if ordinal is None:
            return None
        start = starts[ordinal]
    return start, _value_end(raw, start)


def _top_level_ordinal(raw: bytes, keys: int) -> int | None:
    """Which of the document's `keys` model keys (in order) is the top-level object's last one;
    None when none is at the top level.

    On a copy: escapes that hide a quote or spell a letter of `model` are undone (each quote left
    then delimits a string), model keys become markers, strings are dropped, and what is left,
    brackets and markers, is parsed as nested arrays of zeros.
    """
    text = raw
    if b"\\" in text:
        # Left to right, as a parser pairs them: an escaped backslash, then an escaped quote,
        # each made a byte that is neither a quote nor a letter (so no `model` is spelled).
        text = text.replace(b"\\\\", _HIDDEN).replace(b'\\"', _HIDDEN)
        if _LETTER_ESCAPE in text:
            for letter, escapes in _LETTERS:
                for escape in escapes:
                    text = text.replace(escape, letter)
    text = text.replace(b'"model":', MARKER)
    if _SPACED_KEY.search(text) is not None:
        text = _SPACED_KEY.sub(MARKER, text)
    text = text.translate(None, _NOT_SKELETON)
    # Two quotes in a row close one string and open the next (or hold an empty one): nothing
    # kept lies between them, so they go without changing which brackets are inside strings.
    text = text.replace(b'""', b"")
    if b'"' in text:
        text = b"".join(text.split(b'"')[::2])
    skeleton = text.translate(_AS_ARRAYS)
    for pair, separated in _COMMAS:
        skeleton = skeleton.replace(pair, separated)
    top = orjson.loads(skeleton)
    if skeleton.count(b"0") != keys or not isinstance(top, list):
        raise ValueError("the request body's model keys could not be told apart")
    if 0 not in top:
        return None
    last = len(top) - 1 - top[::-1].index(0)
    after = orjson.dumps(top[last + 1 :]).count(b"0")
    return keys - 1 - after


def _value_end(raw: bytes, start: int) -> int:
    """Where the JSON value that starts at `start` ends (the document is valid)."""
    first = raw[start : start + 1]
    if first == b'"':
        string = _STRING.match(raw, start)
        assert string is not None  # the document parsed
        return string.end()
    if first not in (b"{", b"["):
        scalar = _SCALAR_END.search(raw, start)
        return scalar.start() if scalar else len(raw)
    # A container (never a request's model, which must be a string): walked bracket by bracket.
    depth = 0
    position = start
    while True:
        token = _STRUCTURE.search(raw, position)
        assert token is not None  # the document parsed
        mark = token.group()
        if mark == b'"':
            string = _STRING.match(raw, token.start())
            assert string is not None
            position = string.end()
            continue
        depth += 1 if mark in (b"{", b"[") else -1
        position = token.end()
        if depth == 0:
            return position
