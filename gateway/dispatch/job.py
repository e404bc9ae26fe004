"""What dispatch is given for one client request, and what it reports back about it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from multidict import CIMultiDict

from gateway.catalog import Provider, Timeouts
from gateway.dispatch.memory_budget import Reservation
from gateway.dispatch.outcomes import Attempt, UpstreamErrorAnswer
from gateway.dispatch.renamer import Renamer
from gateway.dispatch.upstream import downstream_headers
from gateway.dispatch.upstream_response import UpstreamResponse
from gateway.dispatch.usage import Usage
from gateway.shared.errors import GatewayError

# What goes upstream: bytes, a streamed upload (a fresh iterator per attempt), or no body.
RequestBody = bytes | AsyncIterator[bytes] | None


@dataclass
class DispatchRecord:
    """What happened to one request upstream, for its log line and metrics."""

    attempts: list[Attempt] = field(default_factory=list)
    served: Provider | None = None
    status: int | None = None
    ttft_seconds: float | None = None
    upstream_ttft_seconds: float | None = None
    bytes_sent: int = 0
    client_disconnected: bool = False
    # Why no further provider was tried though some were left (a reason of `retries`), if so.
    failover_stopped: str | None = None
    # The request's bytes in the worker's memory budget (its body, an upload's copy, a
    # non-streamed answer), held until the request ends.
    buffer: Reservation | None = None
    # The tokens the answer reported (a stream's: what it reported before it ended or broke).
    usage: Usage | None = None
    # The last attempt's upstream error answer (renamed, redacted), if it sent one.
    upstream_answer: UpstreamErrorAnswer | None = None

    @property
    def succeeded(self) -> bool:
        """The provider answered 2xx and, for a stream, finished it."""
        return (
            self.status is not None
            and 200 <= self.status < 300
            and bool(self.attempts)
            and self.attempts[-1].outcome == "ok"
        )


@dataclass(frozen=True)
class DispatchRequest:
    """Everything dispatch needs for one client request.

    `body` gives the bytes for a provider (its upstream model id spliced in); `renamer` the
    rewriting of the provider's model id in its answer, if any; `on_answer` sees a successful
    answer's opening bytes (a whole body, or a stream's first event) before the client does.
    A streamed upload says whether it can still be sent again (`replayable`) and why it could
    not be read (`body_failure`); with `stream_by_answer` a 2xx event stream is streamed even
    when the request did not say so. `key_id` names the client key, for blaming failures.
    `strips_usage` says whether a provider's stream carries a usage event the gateway asked
    for and the client did not: it is taken out of the client's stream.
    """

    request_id: str
    key_id: str
    method: str
    path: str
    body: Callable[[Provider], RequestBody]
    stream: bool
    timeouts: Timeouts
    client_headers: Mapping[str, str]
    response_headers: Callable[[Provider], Mapping[str, str]]
    on_attempt: Callable[[Provider], None]
    started_at: float
    renamer: Callable[[Provider], Renamer | None]
    on_answer: Callable[[Provider, bytes | bytearray], Awaitable[None]]
    stream_by_answer: bool = False
    replayable: Callable[[], bool] = lambda: True
    body_failure: Callable[[], GatewayError | None] = lambda: None
    strips_usage: Callable[[Provider], bool] = lambda provider: False

    def answer_headers(self, provider: Provider, response: UpstreamResponse) -> CIMultiDict[str]:
        """The head of the client's answer: the upstream's allowed headers (the provider's
        credential redacted), the request's own, the provider that served and the request id."""
        headers = downstream_headers(response.headers, provider.redactor)
        headers.update(self.response_headers(provider))
        headers["x-gateway-provider"] = provider.name
        headers["x-request-id"] = self.request_id
        return headers
