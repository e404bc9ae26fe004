"""Model ids in raw JSON answers: the upstream id renamed to the public one (the request's side
is `gateway.edge.model_splice`).

No answer is re-serialised: every other byte stays as the upstream sent it (big integers, key
order, spacing, escapes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Protocol

import orjson


class ModelRenamer:
    """Replaces the exact JSON string of the upstream model id with the public one in a body or
    a stream of chunks, holding back only a tail that could be the start of a split id."""

    def __init__(self, upstream: str, public: str) -> None:
        self._needle = orjson.dumps(upstream)
        self._replacement = orjson.dumps(public)
        self._held = b""

    def whole(self, body: bytes | bytearray) -> bytes | bytearray:
        """A complete body with every occurrence renamed."""
        return body.replace(self._needle, self._replacement)

    def feed(self, chunk: bytes) -> bytes:
        """The next chunk of a stream, renamed; a possible partial id waits for the next one."""
        data = self._held + chunk if self._held else chunk
        needle = self._needle
        last = data.rfind(needle)
        settled = last + len(needle) if last >= 0 else 0
        hold_from = len(data)
        for position in range(max(settled, len(data) - len(needle) + 1), len(data)):
            if data[position] == 0x22 and needle.startswith(data[position:]):  # 0x22: '"'
                hold_from = position
                break
        self._held = data[hold_from:]
        return data[:hold_from].replace(needle, self._replacement)

    def flush(self) -> bytes:
        """What is still held back once the stream ended."""
        held, self._held = self._held, b""
        return held


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
