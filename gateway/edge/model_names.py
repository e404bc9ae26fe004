"""Model ids in raw JSON answers: the upstream id renamed to the public one in the `model`
members only, and in error bodies (the request's side is `gateway.edge.model_splice`).

Both renamers satisfy `gateway.dispatch.renamer.Renamer`, the shape dispatch asks for.

No answer is re-serialised: every other byte stays as the upstream sent it (big integers, key
order, spacing, escapes).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping

import orjson

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
