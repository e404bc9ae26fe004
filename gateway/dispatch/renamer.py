"""What dispatch asks of a model renamer: the edge picks one per provider (the ones in
`gateway.edge.model_names`) and dispatch applies it to the answer it relays."""

from __future__ import annotations

from typing import Protocol


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
