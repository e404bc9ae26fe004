"""A multipart upload streamed through: its head is read until the `model` field is known, the
rest goes to the upstream as it arrives, with a bounded copy kept so a failed attempt can be
replayed on the next provider (past the copy's cap, no failover for that request).

The head is held in the worker's memory budget (503/429 past it, the connection closing); the copy
only while the budget has room for it (else it is dropped: no failover, the upload goes on). The
head is parsed as it arrives, each byte looked at once.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.dispatch.memory_budget import Reservation
from gateway.edge.connections import body_read_timeout, close_after_response
from gateway.edge.endpoints import ClientRequest
from gateway.shared.errors import GatewayError, let_go

# The most of an upload kept in memory for a replay on failover (and never over max_body_bytes).
REPLAY_CAP_BYTES = 32 * 1024 * 1024
# A replay sends what was kept in pieces of this size.
REPLAY_PIECE_BYTES = 256 * 1024

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_PRINTABLE_ASCII = re.compile(r"[ -~]+")
_FIELD_NAME = re.compile(rb'content-disposition:[^\r\n]*;\s*name="([^"]*)"', re.IGNORECASE)


_LIVE: weakref.WeakSet[UploadSource] = weakref.WeakSet()


def live_uploads() -> int:
    """How many uploads' sources are still in memory (being read, or never let go)."""
    return len(_LIVE)


class UploadSource:
    """The client's body, read on demand: the head (up to the `model` field) held whole, the
    bytes after it kept while the total stays within the replay cap."""

    def __init__(
        self,
        request: web.Request,
        *,
        max_body_bytes: int,
        replay_cap: int,
        memory: Reservation | None = None,
    ) -> None:
        self._request = request
        self._memory = memory
        self._max_body_bytes = max_body_bytes
        self._replay_cap = min(replay_cap, max_body_bytes)
        self._timeout = body_read_timeout(request)
        self._deadline = asyncio.get_running_loop().time() + self._timeout
        self._lock = asyncio.Lock()
        self._read = 0
        self._head_bytes = 0
        self._kept = bytearray()
        self._dropped = False
        self._eof = False
        self._in_head = True
        self.failure: GatewayError | None = None
        _LIVE.add(self)

    @property
    def replayable(self) -> bool:
        """Whether every byte read so far can still be sent again."""
        return not self._dropped and self.failure is None

    async def read_head(self) -> bytes:
        """The next piece of the head (b"" at the end of the body); the head is held whole."""
        chunk = await self._next()
        self._head_bytes += len(chunk)
        return chunk

    def finish_head(self) -> None:
        """What was read so far is the head: only the bytes after it are kept for replays."""
        self._in_head = False

    async def rest(self) -> AsyncIterator[bytes]:
        """The body after the head, from its start: the kept copy first, then the client's."""
        position = self._head_bytes
        while True:
            async with self._lock:
                if position < self._read:
                    if self._dropped:
                        raise RuntimeError("the upload is past its replay cap")
                    start = position - self._head_bytes
                    chunk = bytes(self._kept[start : start + REPLAY_PIECE_BYTES])
                elif self._eof:
                    return
                else:
                    chunk = await self._next()
                    if not chunk:
                        return
            position += len(chunk)
            yield chunk

    async def _next(self) -> bytes:
        """One more piece from the client, within the size limit and the body deadline."""
        if self.failure is not None:
            raise self.failure
        if self._eof:
            return b""
        try:
            async with asyncio.timeout_at(self._deadline):
                chunk = await self._request.content.readany()
        except TimeoutError:
            close_after_response(self._request)
            self.failure = GatewayError(
                408,
                f"The request body did not arrive within {self._timeout:g} s.",
                "body_timeout",
                headers={"Connection": "close"},
            )
            raise self.failure from None
        if not chunk:
            self._eof = True
            return b""
        self._read += len(chunk)
        if self._read > self._max_body_bytes:
            self._fail(too_large(self._max_body_bytes, close=True))
        if self._in_head:
            if self._memory is not None:
                try:
                    self._memory.take_now("request_body", len(chunk))
                except GatewayError as refused:
                    self._fail(refused)
        elif not self._dropped:
            if self._read <= self._replay_cap and (
                self._memory is None or self._memory.try_take("upload_copy", len(chunk))
            ):
                self._kept += chunk
            else:
                self._drop_copy()
        return chunk

    def _fail(self, failure: GatewayError) -> None:
        """The upload cannot go on: the copy is let go, the connection closes after the answer."""
        close_after_response(self._request)
        self._drop_copy()
        self.failure = failure
        raise failure

    def _drop_copy(self) -> None:
        self._dropped = True
        self._kept = bytearray()
        if self._memory is not None:
            self._memory.release_use("upload_copy")

    def close(self) -> None:
        """The request is over: the copy is let go, and the failure's tracebacks (whose frames
        refer to this source: a cycle only a garbage collection would free)."""
        self._drop_copy()
        if self.failure is not None:
            let_go(self.failure)


class Upload:
    """A transcription form being streamed: what routing needs, and a body for each attempt."""

    def __init__(self, source: UploadSource, head: bytes, request: ClientRequest) -> None:
        self.source = source
        self.head = head
        self.request = request

    def body_for(self, upstream_model: str) -> AsyncIterator[bytes]:
        """The form for a provider: the head with its model field mapped, then the rest."""
        head = self.request.body_for(upstream_model) or self.head
        return _chain(head, self.source)


async def _chain(head: bytes, source: UploadSource) -> AsyncIterator[bytes]:
    yield head
    async for chunk in source.rest():
        yield chunk


async def open_upload(
    request: web.Request,
    *,
    max_body_bytes: int,
    replay_cap: int,
    memory: Reservation | None = None,
) -> Upload:
    """Read a multipart form's head until its `model` field is complete (or the body ends);
    400 when it is not a form or names no model, 413/408 as for any body, 503/429 past the
    memory budget."""
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise too_large(max_body_bytes)
    content_type = request.headers.get("Content-Type", "")
    boundary = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/form-data") or boundary is None:
        raise GatewayError(
            400, "This endpoint takes a multipart/form-data body.", "invalid_request"
        )
    if not _PRINTABLE_ASCII.fullmatch(boundary.group(1)):
        # RFC 2046's boundaries are ASCII: anything else cannot delimit the parts as sent.
        raise GatewayError(
            400,
            "The multipart boundary must be printable ASCII characters.",
            "invalid_multipart_boundary",
        )
    delimiter = b"--" + boundary.group(1).encode("ascii")
    source = UploadSource(
        request, max_body_bytes=max_body_bytes, replay_cap=replay_cap, memory=memory
    )
    head = FormHead(delimiter)
    while "model" not in head.fields:
        chunk = await source.read_head()
        if not chunk:
            break
        head.feed(chunk)
    source.finish_head()
    raw = bytes(head.raw)
    fields = head.fields
    del head
    return Upload(source, raw, form_request(raw, fields))


def form_request(raw: bytes, fields: dict[str, tuple[int, int]]) -> ClientRequest:
    """The routing view of a form's head: its `model` (spliced in place for an upstream id) and
    `stream`, when that field comes before the model's end."""
    if "model" not in fields:
        raise GatewayError(
            400, "You must provide a model parameter.", "missing_field", param="model"
        )
    start, end = fields["model"]
    model = raw[start:end].decode("utf-8", errors="replace").strip()
    if not model:
        raise GatewayError(
            400, "`model` must be a non-empty string.", "invalid_type", param="model"
        )
    stream = "stream" in fields and raw[slice(*fields["stream"])].strip().lower() == b"true"

    def body_for(upstream_model: str) -> bytes:
        if upstream_model == model:
            return raw
        return raw[:start] + upstream_model.encode() + raw[end:]

    return ClientRequest(model, stream, {}, None, body_for)


class FormHead:
    """A form's head as it arrives: where each complete named part's value lies (the last one of
    a name wins). Each byte is searched once, however the head is cut into pieces."""

    def __init__(self, delimiter: bytes) -> None:
        self.raw = bytearray()
        self.fields: dict[str, tuple[int, int]] = {}
        self._delimiter = delimiter
        self._part = -1  # where the delimiter opening the part not complete yet lies
        self._searched = 0  # no delimiter starts before this, past `_part`

    def feed(self, chunk: bytes) -> None:
        """Take the next piece; the fields of every part it completes are noted."""
        raw = self.raw
        raw += chunk
        delimiter = self._delimiter
        while True:
            found = raw.find(delimiter, self._searched)
            if found < 0:
                self._searched = max(self._searched, len(raw) - len(delimiter) + 1)
                return
            self._searched = found + len(delimiter)
            if self._part >= 0:
                self._note(self._part + len(delimiter), found)
            self._part = found

    def _note(self, start: int, following: int) -> None:
        raw = self.raw
        head_end = raw.find(b"\r\n\r\n", start, following)
        name = _FIELD_NAME.search(raw, start, head_end) if head_end >= 0 else None
        if name is not None:
            value_end = following - 2 if raw[following - 2 : following] == b"\r\n" else following
            self.fields[name.group(1).decode("utf-8", errors="replace")] = (head_end + 4, value_end)


def too_large(limit: int, *, close: bool = False) -> GatewayError:
    """The 413 for a body past `server.max_body_bytes` (closing the connection when the rest of
    the body is left unread)."""
    return GatewayError(
        413,
        f"The request body is larger than the limit of {limit} bytes.",
        "body_too_large",
        headers={"Connection": "close"} if close else None,
    )
