"""Admission: a request's key is authenticated and its limits taken as soon as its head is in,
before any of its body is read.

A key's in-flight count (and its connection share) is taken at admission, and the request's
bytes are counted from then on in the worker's memory budget. A refusal closes the connection
once its answer is out when a body is still unread. `Expect: 100-continue` is checked (key,
declared size, body coding) before the handler runs; `100 Continue` is sent once the request is
admitted. Load shedding asks whether a key is light: fewer requests in flight here than the
mean of the keys that have some.
"""

from __future__ import annotations

from aiohttp import HttpVersion11, web

from gateway.catalog import Catalog, Key
from gateway.dispatch.job import DispatchRecord
from gateway.dispatch.memory_budget import MemoryBudget
from gateway.dispatch.permits import ConnectionShare, KeyLimits
from gateway.edge.authentication import authenticate
from gateway.edge.connections import close_after_response
from gateway.edge.request_body import check_encoding, content_encoding
from gateway.edge.requestid import request_id_of
from gateway.edge.uploads import too_large
from gateway.shared.errors import GatewayError


class Admission:
    """Authenticates requests and admits them within their key's limits and the memory budget."""

    def __init__(
        self,
        catalog: Catalog,
        key_limits: KeyLimits,
        *,
        connections_per_key: ConnectionShare,
        max_body_bytes: int,
        request_compression: bool,
        memory_budget: MemoryBudget | None,
    ) -> None:
        self.catalog = catalog
        self.key_limits = key_limits
        self._connections_per_key = connections_per_key
        self._max_body_bytes = max_body_bytes
        self._request_compression = request_compression
        self.memory_budget = memory_budget

    def authenticate(self, request: web.BaseRequest) -> Key:
        """The request's key, or a 401."""
        return authenticate(self.catalog, request)

    async def admit(self, key: Key, record: DispatchRecord) -> None:
        """Take one of the key's requests in flight (429/503 when its limits are spent) and open
        the request's reservation in the memory budget, if there is one."""
        await self.key_limits.admit(key, self._connections_per_key)
        if self.memory_budget is not None:
            record.buffer = self.memory_budget.reservation(key.id)

    async def expect_continue(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: the key, the declared size and the body's coding are checked
        before the handler runs; on failure the error, and the connection closes. `100 Continue`
        itself is sent by the handler once the key's limits admitted the request."""
        try:
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise GatewayError(
                    417, "Only `Expect: 100-continue` is supported.", "expectation_failed"
                )
            self.authenticate(request)
            encoding = content_encoding(request.headers.get("Content-Encoding"))
            check_encoding(encoding, allowed=self._request_compression)
            length = request.content_length
            if length is not None and length > self._max_body_bytes:
                raise too_large(self._max_body_bytes)
        except GatewayError as error:
            close_after_response(request)
            return error.to_response({"x-request-id": request_id_of(request)})
        return None

    def is_light(self, request: web.BaseRequest) -> bool:
        """Whether the request's key has fewer requests in flight on this worker than the mean
        of the keys that have some (False without a valid key): load shedding spares it more."""
        try:
            key = self.authenticate(request)
        except GatewayError:
            return False
        return self.key_limits.below_mean(key)


def refused(request: web.BaseRequest) -> None:
    """A refused request's body nobody will read is not waited for: the connection closes once
    the refusal is out."""
    if not request.content.is_eof():
        close_after_response(request)


async def ask_for_body(request: web.Request) -> None:
    """Send `100 Continue` to a client that waits for it before sending its body."""
    expects = request.headers.get("Expect", "").lower() == "100-continue"
    if expects and request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # Not the response: errors after this still get a whole answer of their own.
        request.writer.output_size = 0
