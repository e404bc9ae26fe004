"""Dispatch: walk the failover list, retry before the first byte reaches the client, then stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway.catalog import Provider, Timeouts
from gateway.config import RoutingSettings
from gateway.dispatch.blame import RequestBlame
from gateway.dispatch.delivery import (
    ClientStalledError,
    HeldHeadResponse,
    end_incomplete,
    whole_answer,
    write_last,
    write_within,
)
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.memory_budget import Reservation
from gateway.dispatch.outcomes import (
    Attempt,
    RetryableAttemptError,
    UpstreamErrorAnswer,
    exhausted,
    failed_status,
    outcome_of,
    relayed,
)
from gateway.dispatch.permits import ProviderPermits
from gateway.dispatch.renamer import Renamer
from gateway.dispatch.retries import (
    BUDGET,
    REQUEST_SUSPECTED,
    SHOULD_RETRY,
    RetryBudget,
    RetrySlot,
    resend_is_futile,
)
from gateway.dispatch.upstream import (
    EventStreamFraming,
    close_response,
    downstream_headers,
    is_success,
    read_opening,
    read_rest,
    upstream_headers,
    usable_answer,
)
from gateway.dispatch.upstream_errors import (
    ConnectTimeoutError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTlsError,
)
from gateway.dispatch.upstream_pool import UpstreamPool
from gateway.dispatch.upstream_response import UpstreamResponse
from gateway.dispatch.usage import StreamUsage, Usage, usage_from_body
from gateway.shared.errors import GatewayError, sse_error_event

logger = structlog.get_logger("gateway.dispatch.dispatcher")

# A non-streamed answer is held in memory before it is sent; beyond this it is refused.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

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


class Dispatcher:
    """Sends a request to the providers of a failover list in order, within a budget."""

    def __init__(
        self,
        client: UpstreamPool,
        health: ProviderHealth,
        permits: ProviderPermits,
        routing: RoutingSettings,
        retries: RetryBudget,
        *,
        dropped_headers: frozenset[str],
        on_cooldown: Callable[[str], None],
        max_first_event_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._client = client
        self._on_cooldown = on_cooldown
        self._health = health
        self._permits = permits
        self._failover_budget = routing.failover_budget
        self._retries = retries
        self._wait_timeout = routing.wait_timeout_seconds
        self._dropped_headers = dropped_headers
        self._max_first_event_bytes = max_first_event_bytes
        self._write_timeout = routing.downstream_write_timeout_seconds

    async def dispatch(
        self,
        request: web.Request,
        job: DispatchRequest,
        providers: Sequence[Provider],
        record: DispatchRecord,
    ) -> web.StreamResponse:
        """Answer the client from the first provider that works; raise GatewayError if none does.

        Cooling providers are skipped; each attempt takes a permit on the first provider left
        in the list that has one free, or waits in line for any of them. What a failed attempt
        teaches the providers' health is decided with the request's other attempts in view.

        An attempt after the first is a retry: made only within the worker's retry budget, and
        not at all once the request itself is the suspect (two providers failed it alike). When
        every candidate failed, or the request is the suspect, the error says
        `x-should-retry: false`, unless it says when to come back (`Retry-After`) or a resend
        would cost the upstreams nothing.
        """
        remaining = [provider for provider in providers if not self._health.cooling(provider.name)]
        if not remaining:
            raise GatewayError(
                429,
                "Every provider for this model is cooling down after failures or rate limits.",
                "providers_cooling",
                retry_after=self._health.soonest_recovery(provider.name for provider in providers),
            )
        blame = RequestBlame(self._health, job.key_id, self._on_cooldown)
        try:
            # A plain loop: a failed attempt is a RetryableAttemptError, the budget caps the
            # attempts, and nothing waits between them (a framework's per-attempt state costs
            # more than the whole rule).
            for _ in range(min(self._failover_budget, len(remaining))):
                retry: RetrySlot | None = None
                if record.attempts:
                    retry = self._retry(job, blame, record)
                    if retry is None:
                        break
                try:
                    provider = await self._take_permit(remaining)
                    remaining.remove(provider)
                    try:
                        return await self._attempt(
                            request, job, provider, record, blame, retry=retry
                        )
                    except RetryableAttemptError:
                        continue
                    finally:
                        self._permits.release(provider.name)
                finally:
                    if retry is not None:
                        retry.release()
        finally:
            blame.settle()
        error = relayed(exhausted(record.attempts), record.attempts, record.upstream_answer)
        tried = not remaining or blame.request_suspected
        if tried and error.retry_after is None and resend_is_futile(record.attempts):
            # The gateway already did what a client's resend would: the OpenAI SDKs obey this.
            error.headers[SHOULD_RETRY] = "false"
        raise error

    def _retry(
        self, job: DispatchRequest, blame: RequestBlame, record: DispatchRecord
    ) -> RetrySlot | None:
        """A place in the retry budget for the request's next attempt, or None: no retry."""
        if not job.replayable():
            # A streamed upload past its kept copy cannot be sent again.
            return None
        if blame.request_suspected:
            self._retries.forgo(REQUEST_SUSPECTED)
            record.failover_stopped = REQUEST_SUSPECTED
            return None
        retry = self._retries.try_start(after=record.attempts[-1].outcome)
        if retry is None:
            record.failover_stopped = BUDGET
        return retry

    async def _take_permit(self, remaining: list[Provider]) -> Provider:
        """The first provider with a free permit (waiting in line if needed), paced."""
        name = await self._permits.acquire_first(
            [provider.name for provider in remaining], self._wait_timeout
        )
        if name is None:
            raise GatewayError(
                503,
                "Every provider for this model is at its concurrency limit; try again shortly.",
                "providers_busy",
                retry_after=1,
            )
        provider = next(provider for provider in remaining if provider.name == name)
        try:
            await self._permits.pace(name)
        except BaseException:
            self._permits.release(name)
            raise
        return provider

    async def _attempt(
        self,
        request: web.Request,
        job: DispatchRequest,
        provider: Provider,
        record: DispatchRecord,
        blame: RequestBlame,
        *,
        retry: RetrySlot | None,
    ) -> web.StreamResponse:
        body = job.body(provider)
        headers = upstream_headers(
            job.client_headers, provider, job.request_id, self._dropped_headers
        )
        timeouts = job.timeouts
        # vLLM sends nothing until a non-streamed answer is complete: it is bounded as a whole.
        limit = timeouts.first_byte_seconds if job.stream else timeouts.response_seconds
        job.on_attempt(provider)
        attempt_started = time.monotonic()
        response: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(limit) as deadline:
                if body is not None and not isinstance(body, bytes):
                    body = _timed_from_upload_end(body, deadline, limit)
                # Never a redirect followed (the client follows none): an upstream must not steer
                # the gateway elsewhere. A stream may be silent at most its first-byte limit
                # between reads; a non-streamed answer is bounded as a whole by the deadline.
                response = await self._client.request(
                    job.method,
                    provider.base_url,
                    job.path,
                    headers,
                    body,
                    connect_timeout=timeouts.connect_seconds,
                    read_timeout=timeouts.first_byte_seconds if job.stream else None,
                    tls_ca_file=provider.tls_ca_file,
                )
                failure = await failed_status(response, provider.redactor)
                if failure is not None:
                    raise failure
                stream = job.stream or (
                    job.stream_by_answer
                    and is_success(response)
                    and response.content_type == "text/event-stream"
                )
                first_chunk = await read_opening(response, stream, self._max_first_event_bytes)
                first_byte_at = time.monotonic()
                whole = None
                if not (stream and is_success(response)):
                    whole = await self._read_whole(response, first_chunk, record)
            if not usable_answer(response, stream, first_chunk, whole):
                raise RetryableAttemptError("invalid_response", status=response.status)
        except RetryableAttemptError as failure:
            close_response(response)
            self._upload_failed(job)
            if failure.answer is not None:
                failure.answer = _relayable(failure.answer, job.renamer(provider), provider)
            self._failed(record, provider, failure, blame)
            raise
        except TimeoutError as error:
            close_response(response)
            self._upload_failed(job)
            self._timed_out(record, provider, timeouts, error, blame)
        except UpstreamError as error:
            close_response(response)
            self._upload_failed(job)
            outcome = outcome_of(error, answered=response is not None)
            if isinstance(error, UpstreamTlsError):
                logger.warning("upstream_tls_failed", provider=provider.name, reason=error.reason)
            broken = RetryableAttemptError(outcome)
            # Only a connection never made is the provider's alone whatever was sent; one dropped
            # after the request went out may be that request's doing (see `blame`).
            connected = not isinstance(error, UpstreamConnectError)
            self._failed(record, provider, broken, blame, connected=connected)
            raise broken from error
        except BaseException:
            close_response(response)
            raise

        blame.answered(is_success(response))
        if retry is not None:
            retry.release()  # answered: a stream no longer holds the retry budget
        record.ttft_seconds = first_byte_at - job.started_at
        record.upstream_ttft_seconds = first_byte_at - attempt_started
        record.served = provider
        try:
            if is_success(response):
                await job.on_answer(provider, first_chunk if whole is None else whole)
            if whole is None:
                return await self._stream(
                    request=request,
                    job=job,
                    provider=provider,
                    response=response,
                    first_chunk=first_chunk,
                    record=record,
                    blame=blame,
                )
            return self._whole(job, provider, response, whole, record)
        finally:
            close_response(response)

    @staticmethod
    def _upload_failed(job: DispatchRequest) -> None:
        """A failed attempt whose cause is the client's upload (too large, too slow) is the
        client's error, not the provider's."""
        failure = job.body_failure()
        if failure is not None:
            raise failure

    async def _read_whole(
        self, response: UpstreamResponse, first_chunk: bytes, record: DispatchRecord
    ) -> bytearray:
        """A non-streamed answer, counted in the worker's answer budget while it is held."""
        buffer = record.buffer
        try:
            return await read_rest(
                response, first_chunk, MAX_RESPONSE_BYTES, buffer.take if buffer else None
            )
        except BaseException:
            if buffer is not None:
                buffer.release_use("answer")
            raise

    def _timed_out(
        self,
        record: DispatchRecord,
        provider: Provider,
        timeouts: Timeouts,
        error: TimeoutError,
        blame: RequestBlame,
    ) -> NoReturn:
        """A connect timeout fails over; a timeout after the upstream accepted the request fails
        over only with `retry_after_timeout` (it may still be generating), else it is a 504."""
        if isinstance(error, ConnectTimeoutError):
            unreachable = RetryableAttemptError("connect_timeout")
            self._failed(record, provider, unreachable, blame)
            raise unreachable from None
        timed_out = RetryableAttemptError("timeout")
        self._failed(record, provider, timed_out, blame)
        if timeouts.retry_after_timeout:
            raise timed_out from None
        raise GatewayError(
            504,
            f"The upstream accepted the request but did not answer in time ({provider.name}); "
            "it was not replayed elsewhere.",
            "upstream_timeout",
        ) from None

    def _whole(
        self,
        job: DispatchRequest,
        provider: Provider,
        response: UpstreamResponse,
        body: bytearray,
        record: DispatchRecord,
    ) -> web.Response:
        """Answer the client with a non-streamed answer that was read and checked whole."""
        self._health.succeeded(provider.name)
        record.attempts.append(Attempt(provider.name, "ok", response.status))
        record.status = response.status
        if is_success(response):
            record.usage = usage_from_body(body)
        renamer = job.renamer(provider)
        answer: bytes | bytearray = body
        if is_success(response):
            answer = renamer.whole(body) if renamer is not None else body
            redactor = provider.redactor
            if redactor is not None and redactor.scans_answers:
                # An answer may echo what the upstream received: never the provider's credential.
                answer = redactor.redact(answer)
        else:
            answer = _relayable(
                UpstreamErrorAnswer(response.status, None, bytes(body)), renamer, provider
            ).body
        record.bytes_sent = len(answer)
        return whole_answer(response.status, answer, self._headers(job, provider, response))

    def _headers(
        self, job: DispatchRequest, provider: Provider, response: UpstreamResponse
    ) -> CIMultiDict[str]:
        headers = downstream_headers(response.headers, provider.redactor)
        headers.update(job.response_headers(provider))
        headers["x-gateway-provider"] = provider.name
        headers["x-request-id"] = job.request_id
        return headers

    async def _stream(
        self,
        *,
        request: web.Request,
        job: DispatchRequest,
        provider: Provider,
        response: UpstreamResponse,
        first_chunk: bytes,
        record: DispatchRecord,
        blame: RequestBlame,
    ) -> web.StreamResponse:
        """Pass an SSE stream through chunk by chunk; after the first byte nothing is retried.

        A stream that breaks, or has an event past MAX_SSE_EVENT_BYTES, ends with an OpenAI-style
        error event; a stream that ends cleanly passes through as it is, `[DONE]` or not.
        """
        headers = self._headers(job, provider, response)
        # The head goes out with the first bytes; the last bytes with the stream's end, once
        # the upstream's answer is all in: a stream that came in one read leaves in one write.
        downstream = HeldHeadResponse(status=response.status, headers=headers)
        downstream.enable_chunked_encoding()
        record.status = response.status
        await downstream.prepare(request)
        framing = EventStreamFraming()
        renamer = job.renamer(provider)
        usage = StreamUsage(strip=job.strips_usage(provider))
        scanned = provider.redactor
        redactor = scanned.stream() if scanned is not None and scanned.scans_answers else None
        last = b""
        chunk = first_chunk
        head = True  # the head is still held
        ended = False
        try:
            while chunk:
                if not framing.accepts(chunk):
                    return await self._end_broken_stream(
                        request,
                        downstream,
                        provider,
                        record,
                        last,
                        outcome="malformed_stream",
                        blame=blame,
                    )
                chunk = usage.feed(chunk)
                if renamer is not None and chunk:
                    chunk = renamer.feed(chunk)
                if redactor is not None:
                    chunk = redactor.feed(chunk)
                if response.at_eof:
                    break  # the upstream is done: this chunk is the last
                if chunk:  # (empty while an event is held to see whether it is usage only)
                    await write_within(request, downstream, chunk, self._write_timeout, head=head)
                    head = False
                    record.bytes_sent += len(chunk)
                    last = chunk
                chunk = await response.read()
            if held := usage.flush():
                if renamer is not None:
                    held = renamer.feed(held)
                chunk += redactor.feed(held) if redactor is not None else held
            if renamer is not None and (held := renamer.flush()):
                chunk += redactor.feed(held) if redactor is not None else held
            if redactor is not None:
                chunk += redactor.flush()
            if chunk:
                ended = await write_last(request, downstream, chunk, self._write_timeout, head=head)
                record.bytes_sent += len(chunk)
        except ClientStalledError:
            # The client stopped reading: it was dropped; the caller closes the upstream.
            record.client_disconnected = True
            record.attempts.append(Attempt(provider.name, "client_stalled", response.status))
            return downstream
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The client went away: stop reading upstream (the caller closes it); not its fault.
            record.client_disconnected = True
            record.attempts.append(Attempt(provider.name, "client_disconnected", response.status))
            return downstream
        except (UpstreamError, TimeoutError):
            return await self._end_broken_stream(
                request,
                downstream,
                provider,
                record,
                last,
                outcome="dropped_mid_stream",
                blame=blame,
            )
        finally:
            record.usage = usage.usage  # what the stream reported, however it ended
        self._health.succeeded(provider.name)
        record.attempts.append(Attempt(provider.name, "ok", response.status))
        if not ended:
            await downstream.write_eof()
        return downstream

    async def _end_broken_stream(
        self,
        request: web.Request,
        downstream: web.StreamResponse,
        provider: Provider,
        record: DispatchRecord,
        last: bytes,
        *,
        outcome: str,
        blame: RequestBlame,
    ) -> web.StreamResponse:
        """End a started stream with an error event, then an aborted transfer (no chunked end:
        HTTP clients see the failure, as they would directly, and know not to reuse the
        connection); a transport failure counts against the provider (an oversized event does
        not: the upstream is there and answering)."""
        if outcome == "dropped_mid_stream":
            blame.provider_fault(provider.name)
        record.attempts.append(Attempt(provider.name, outcome, record.status))
        message = (
            "The upstream stream ended unexpectedly; the response is incomplete."
            if outcome == "dropped_mid_stream"
            else "The upstream sent a malformed event stream; the response is incomplete."
        )
        code = "upstream_dropped" if outcome == "dropped_mid_stream" else "upstream_malformed"
        separator = b"" if last.endswith(b"\n\n") else b"\n\n"
        downstream.force_close()
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            await downstream.write(separator + sse_error_event(message, code))
        end_incomplete(request)
        return downstream

    def _failed(
        self,
        record: DispatchRecord,
        provider: Provider,
        failure: RetryableAttemptError,
        blame: RequestBlame,
        *,
        connected: bool = True,
    ) -> None:
        """Note a failed attempt, and let the provider's health learn from it."""
        record.upstream_answer = failure.answer
        record.attempts.append(
            Attempt(
                provider.name, failure.reason, failure.status, failure.retry_after, failure.message
            )
        )
        if failure.reason == "upstream_auth_failed":
            logger.error(
                "upstream_credential_refused",
                provider=provider.name,
                status=failure.status,
                detail="the provider's api_key is wrong or lacks access; failing over",
            )
        blame.failed(provider.name, failure, connected=connected)


def _relayable(
    answer: UpstreamErrorAnswer, renamer: Renamer | None, provider: Provider
) -> UpstreamErrorAnswer:
    """An upstream error answer as the client may see it: the upstream model id renamed, and
    never the provider's credential (an error may echo what the upstream received)."""
    body = renamer.error(answer.body) if renamer is not None else answer.body
    redactor = provider.redactor
    return replace(
        answer, body=redactor.redact(bytes(body)) if redactor is not None else bytes(body)
    )


async def _timed_from_upload_end(
    body: AsyncIterator[bytes], deadline: asyncio.Timeout, limit: float
) -> AsyncIterator[bytes]:
    """A streamed upload, sent on: while it is being sent the answer's limit is an idle limit
    (a slow client is not the upstream's fault; the body deadline bounds the client), and it
    counts in full from the upload's end."""
    loop = asyncio.get_running_loop()
    async for chunk in body:
        yield chunk
        _push(deadline, loop.time() + limit)
    _push(deadline, loop.time() + limit)


def _push(deadline: asyncio.Timeout, when: float) -> None:
    """Move an attempt's deadline, unless it has already fired or its attempt has moved on."""
    with contextlib.suppress(RuntimeError):
        deadline.reschedule(when)
