"""Model ids in raw JSON: splice the request's `model` value, rename the upstream id in answers
(the `model` members only) and in error bodies.

Neither direction re-serialises a document: every other byte stays as the client or the
upstream sent it (big integers, key order, spacing, escapes).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from typing import Protocol

import orjson

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
# The unrolled form: runs of plain bytes are matched at once, not one alternation per byte.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR_END = re.compile(rb"[ \t\r\n,}\]]")
_STRUCTURE = re.compile(rb'["{}\[\]]')


def replace_model(raw: bytes, model: str) -> bytes:
    """`raw` (a JSON object orjson accepted) with its top-level `model` value set to `model`.

    The value's bytes are replaced in place; when the key appears more than once the last one
    counts (as for the parser). Without a `model` key the object gains one at its end.
    """
    span = _model_value_span(raw)
    value = orjson.dumps(model)
    if span is None:
        closing = raw.rstrip().rfind(b"}")
        separator = b"," if raw[:closing].rstrip()[-1:] != b"{" else b""
        return raw[:closing] + separator + b'"model":' + value + raw[closing:]
    start, end = span
    return raw[:start] + value + raw[end:]


def _model_value_span(raw: bytes) -> tuple[int, int] | None:
    position = _skip_space(raw, raw.find(b"{") + 1)
    found: tuple[int, int] | None = None
    while position < len(raw) and raw[position : position + 1] != b"}":
        key = _STRING.match(raw, position)
        if key is None:
            return found
        position = _skip_space(raw, key.end())
        position = _skip_space(raw, position + 1)  # the colon
        end = _value_end(raw, position)
        if orjson.loads(key.group()) == "model":
            found = (position, end)
        position = _skip_space(raw, end)
        if raw[position : position + 1] == b",":
            position = _skip_space(raw, position + 1)
    return found


def _skip_space(raw: bytes, position: int) -> int:
    match = _WHITESPACE.match(raw, position)
    return match.end() if match else position


def _value_end(raw: bytes, start: int) -> int:
    first = raw[start : start + 1]
    if first == b'"':
        string = _STRING.match(raw, start)
        assert string is not None  # the document parsed
        return string.end()
    if first not in (b"{", b"["):
        scalar = _SCALAR_END.search(raw, start)
        return scalar.start() if scalar else len(raw)
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


# The bytes before a renamed value that a stream chunk may have left in the previous chunk.
CONTEXT_BYTES = 32
_SPACE_BYTES = frozenset(b" \t\r\n")
_MODEL_KEY = b'"model"'
_COMPACT_KEY = b'"model":'
_COLON = ord(":")
_BACKSLASH = ord("\\")


def _is_model_member(data: bytes | bytearray, position: int, before: bytes) -> bool:
    """Whether the JSON string at `position` is the value of a `"model"` member (structure, not
    text: inside a string every quote is escaped, so the bytes `"model":"…"` cannot occur there).
    `before` holds what came just before `data` in a stream."""
    if (
        position > len(_COMPACT_KEY)
        and data[position - len(_COMPACT_KEY) : position] == _COMPACT_KEY
    ):
        return data[position - len(_COMPACT_KEY) - 1] != _BACKSLASH  # the usual, compact form
    if position < CONTEXT_BYTES and before:
        data = before + bytes(data[:position])
        position = len(data)
    index = position - 1
    while index >= 0 and data[index] in _SPACE_BYTES:
        index -= 1
    if index < 0 or data[index] != _COLON:
        return False
    index -= 1
    while index >= 0 and data[index] in _SPACE_BYTES:
        index -= 1
    key_start = index - len(_MODEL_KEY) + 1
    return (
        key_start >= 0
        and data[key_start : index + 1] == _MODEL_KEY
        and (key_start == 0 or data[key_start - 1] != _BACKSLASH)
    )


def _renamed(
    data: bytes | bytearray, needle: bytes, replacement: bytes, before: bytes = b""
) -> bytes | bytearray:
    """`data` with each `model` member whose value is `needle` given `replacement` instead (a
    bytearray is edited in place: a large answer is not copied again)."""
    found: list[int] = []
    position = data.find(needle)
    while position >= 0:
        if _is_model_member(data, position, before):
            found.append(position)
        position = data.find(needle, position + len(needle))
    if not found:
        return data
    if isinstance(data, bytearray):
        for position in reversed(found):
            data[position : position + len(needle)] = replacement
        return data
    pieces: list[bytes] = []
    start = 0
    for position in found:
        pieces += (data[start:position], replacement)
        start = position + len(needle)
    pieces.append(data[start:])
    return b"".join(pieces)


class ModelRenamer:
    """Renames the upstream model id to the public one in an answer: only the value of `model`
    members (each stream chunk's, a Responses event's `response.model`), never text the model
    generated. A stream holds back only a tail that could be the start of a split id."""

    def __init__(self, upstream: str, public: str) -> None:
        self._upstream = upstream
        self._public = public
        self._needle = orjson.dumps(upstream)
        self._replacement = orjson.dumps(public)
        self._held = b""
        self._before = b""

    def whole(self, body: bytes | bytearray) -> bytes | bytearray:
        """A complete body, its `model` members renamed."""
        return _renamed(body, self._needle, self._replacement)

    def feed(self, chunk: bytes) -> bytes:
        """The next chunk of a stream, renamed; a possible partial id waits for the next one."""
        data = self._held + chunk if self._held else chunk
        needle = self._needle
        last = data.rfind(needle)
        settled = last + len(needle) if last >= 0 else 0
        hold_from = len(data)
        # Only a quote in the last bytes can start a split id (there are few: no byte loop).
        position = data.find(b'"', max(settled, len(data) - len(needle) + 1))
        while position >= 0:
            if needle.startswith(data[position:]):
                hold_from = position
                break
            position = data.find(b'"', position + 1)
        self._held = data[hold_from:]
        out = data[:hold_from]
        renamed = _renamed(out, needle, self._replacement, self._before)
        self._before = (
            out[-CONTEXT_BYTES:]
            if len(out) >= CONTEXT_BYTES
            else (self._before + out)[-CONTEXT_BYTES:]
        )
        return bytes(renamed)

    def flush(self) -> bytes:
        """What is still held back once the stream ended."""
        held, self._held = self._held, b""
        return held

    def error(self, body: bytes | bytearray) -> bytes | bytearray:
        """An upstream error body with the upstream id renamed wherever it stands as a whole
        name (messages quote it: "The model `x` does not exist")."""
        return rename_in_error(body, {self._upstream: self._public})


def rename_in_error(body: bytes | bytearray, names: Mapping[str, str]) -> bytes | bytearray:
    """`body` with each upstream id of `names` (JSON-escaped, not part of a longer name)
    replaced by its public name."""
    for upstream, public in names.items():
        escaped = orjson.dumps(upstream)[1:-1]
        if escaped not in body:
            continue
        whole_name = re.compile(rb"(?<![\w./:@-])" + re.escape(escaped) + rb"(?![\w/:@-]|\.\w)")
        replacement = orjson.dumps(public)[1:-1]
        body = whole_name.sub(lambda _, name=replacement: name, body)
    return body


class Renamer(Protocol):
    """Rewrites model ids in an answer: a whole body, or a stream chunk by chunk."""

    def whole(self, body: bytes | bytearray) -> bytes | bytearray:
        """A complete body, renamed."""
        ...

    def feed(self, chunk: bytes) -> bytes:
        """The next chunk of a stream, renamed."""
        ...

    def flush(self) -> bytes:
        """What is still held back once the stream ended."""
        ...

    def error(self, body: bytes | bytearray) -> bytes | bytearray:
        """An upstream error body, renamed."""
        ...


class AnswerRenamer:
    """For an answer to a request that named no model (a stored response fetched by id): the
    model the answer itself names is renamed to the public name it stands for, if any. A stream
    is recognised by its first event, which the first chunk always holds whole."""

    def __init__(self, public_names: Mapping[str, str], keeps: Callable[[str], bool]) -> None:
        self._public_names = public_names
        self._keeps = keeps
        self._inner: ModelRenamer | None = None
        self._first = True

    def _renamer_for(self, document: object) -> ModelRenamer | None:
        if isinstance(document, dict) and isinstance(document.get("response"), dict):
            document = document["response"]  # a Responses stream event wraps the response
        upstream = document.get("model") if isinstance(document, dict) else None
        public = self._public_names.get(upstream) if isinstance(upstream, str) else None
        if upstream is None or public is None or self._keeps(public):
            return None
        return ModelRenamer(upstream, public)

    def whole(self, body: bytes | bytearray) -> bytes | bytearray:
        """The body with its upstream model id replaced by the public name."""
        try:
            renamer = self._renamer_for(orjson.loads(body))
        except orjson.JSONDecodeError:
            return body
        return renamer.whole(body) if renamer is not None else body

    def feed(self, chunk: bytes) -> bytes:
        """The next chunk of a stream, renamed after the model of its first event."""
        if self._first:
            self._first = False
            for line in chunk.splitlines():
                if line.startswith(b"data:"):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        self._inner = self._renamer_for(orjson.loads(line[5:]))
                    break
        return self._inner.feed(chunk) if self._inner is not None else chunk

    def flush(self) -> bytes:
        """What is still held back once the stream ended."""
        return self._inner.flush() if self._inner is not None else b""

    def error(self, body: bytes | bytearray) -> bytes | bytearray:
        """An upstream error body with any upstream id the provider maps renamed."""
        names = {
            upstream: public
            for upstream, public in self._public_names.items()
            if not self._keeps(public)
        }
        return rename_in_error(body, names)
