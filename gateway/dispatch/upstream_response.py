"""An upstream's answer as the pool hands it over: status, head, and a body read piece by piece,
then released (its connection back to the pool) or dropped."""

from __future__ import annotations

from typing import Final, Protocol

from multidict import CIMultiDictProxy

from gateway.dispatch.http1 import Http1Connection
from gateway.dispatch.origin import Origin

DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"


class ConnectionKeeper(Protocol):
    """Where a connection goes back when its exchange ended cleanly (the pool)."""

    def put(self, origin: Origin, connection: Http1Connection) -> None:
        """Keep `connection` for the next request to `origin`."""


class UpstreamResponse:
    """An upstream's answer: its status and head, and its body read piece by piece."""

    __slots__ = ("_connection", "_origin", "_pool", "headers", "status")

    def __init__(self, pool: ConnectionKeeper, origin: Origin, connection: Http1Connection) -> None:
        assert connection.headers is not None
        self._pool = pool
        self._origin = origin
        self._connection: Http1Connection | None = connection
        self.status = connection.status
        self.headers: CIMultiDictProxy[str] = connection.headers

    @property
    def content_type(self) -> str:
        """The media type, lower-cased, without parameters (`application/octet-stream` if none)."""
        return content_type_of(self.headers)

    @property
    def content_length(self) -> int | None:
        """The announced body length, if any."""
        return content_length_of(self.headers)

    async def read(self) -> bytes:
        """The body's next bytes (what has arrived, waiting for some); b"" at its end. Raises
        UpstreamBrokenError when the connection breaks or the body breaks its framing,
        ReadTimeoutError after too long a silence."""
        connection = self._connection
        if connection is None:
            return b""
        return await connection.read()

    @property
    def at_eof(self) -> bool:
        """Whether the body was read to its end."""
        connection = self._connection
        return connection is None or connection.at_eof

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if it can carry another
        request, and is closed otherwise."""
        connection, self._connection = self._connection, None
        if connection is not None and connection.finish():
            self._pool.put(self._origin, connection)

    def close(self) -> None:
        """Drop the answer and its connection (an upstream still sending sees it at once)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()


def content_type_of(headers: CIMultiDictProxy[str]) -> str:
    """The media type of an answer, lower-cased, without parameters; aiohttp's default when it
    names none or no valid one."""
    raw = headers.get("Content-Type")
    if raw is None:
        return DEFAULT_CONTENT_TYPE
    media = raw.partition(";")[0].strip().lower()
    return media if media.count("/") == 1 else DEFAULT_CONTENT_TYPE


def content_length_of(headers: CIMultiDictProxy[str]) -> int | None:
    """The announced body length, if any and well-formed."""
    raw = headers.get("Content-Length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None
