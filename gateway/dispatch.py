"""Dispatch: walk the failover list, retry before the first byte reaches the client, then stream."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from gateway.catalog import Provider
from gateway.config import RoutingSettings
from gateway.errors import GatewayError, sse_error_event
from gateway.health import ProviderHealth
from gateway.payload import Payload
from gateway.permits import ProviderPermits
from gateway.upstream import downstream_headers, upstream_headers

RETRYABLE_STATUSES = frozenset({408, 429})
# A non-streamed answer is held in memory before it is sent; beyond this it is refused.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


class RetryableAttemptError(Exception):
    """An attempt failed before anything reached the client; the next provider may be tried."""

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


@dataclass
class Attempt:
    """One provider tried for a request and how it went."""

    provider: str
    outcome: str
    status: int | None = None
    retry_after: float | None = None


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
    """Everything dispatch needs for one client request."""

    request_id: str
    path: str
    payload: Payload
    model: str
    client_headers: Mapping[str, str]
    response_headers: Callable[[Provider], Mapping[str, str]]
    on_attempt: Callable[[Provider], None]
    started_at: float


class Dispatcher:
    """Sends a request to the providers of a failover list in order, within a budget."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        health: ProviderHealth,
        permits: ProviderPermits,
        routing: RoutingSettings,
        *,
        dropped_headers: frozenset[str],
        on_cooldown: Callable[[str], None],
    ) -> None:
        self._session = session
        self._on_cooldown = on_cooldown
        self._health = health
        self._permits = permits
        self._failover_budget = routing.failover_budget
        self._first_byte_timeout = routing.first_byte_timeout_seconds
        self._wait_timeout = routing.wait_timeout_seconds
        self._dropped_headers = dropped_headers

    async def dispatch(
        self,
        request: web.Request,
        job: DispatchRequest,
        providers: Sequence[Provider],
        record: DispatchRecord,
    ) -> web.StreamResponse:
        """Answer the client from the first provider that works; raise GatewayError if none does.

        Cooling providers are skipped; each attempt takes a permit on the first provider left
        in the list that has one free, or waits in line for any of them.
        """
        remaining = [provider for provider in providers if not self._health.cooling(provider.name)]
        if not remaining:
            raise GatewayError(
                429,
                "Every provider for this model is cooling down after failures or rate limits.",
                "providers_cooling",
                retry_after=self._health.soonest_recovery(provider.name for provider in providers),
            )
        retrying = AsyncRetrying(
            stop=stop_after_attempt(min(self._failover_budget, len(remaining))),
            retry=retry_if_exception_type(RetryableAttemptError),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    provider = await self._take_permit(remaining)
                    remaining.remove(provider)
                    try:
                        return await self._attempt(request, job, provider, record)
                    finally:
                        self._permits.release(provider.name)
        except RetryableAttemptError:
            pass
        raise _exhausted(record)

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
    ) -> web.StreamResponse:
        upstream_model = provider.upstream_models[job.model]
        body = job.payload.for_upstream(upstream_model)
        headers = upstream_headers(
            job.client_headers, provider, job.request_id, self._dropped_headers
        )
        job.on_attempt(provider)
        attempt_started = time.monotonic()
        deadline = asyncio.timeout(self._first_byte_timeout)
        response: aiohttp.ClientResponse | None = None
        try:
            async with deadline:
                response = await self._session.post(
                    provider.base_url + job.path, data=body, headers=headers
                )
                if response.status >= 500 or response.status in RETRYABLE_STATUSES:
                    raise RetryableAttemptError(
                        f"http_{response.status}",
                        status=response.status,
                        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                    )
                first_chunk = await response.content.readany()
        except RetryableAttemptError as failure:
            self._failed(record, provider, failure)
            _close(response)
            raise
        except TimeoutError:
            _close(response)
            timed_out = RetryableAttemptError("timeout")
            self._failed(record, provider, timed_out)
            raise timed_out from None
        except aiohttp.ClientError as error:
            _close(response)
            broken = RetryableAttemptError("connect_error" if response is None else "payload_error")
            self._failed(record, provider, broken)
            raise broken from error
        except BaseException:
            _close(response)
            raise

        now = time.monotonic()
        record.ttft_seconds = now - job.started_at
        record.upstream_ttft_seconds = now - attempt_started
        record.served = provider
        try:
            if 200 <= response.status < 300 and _is_event_stream(response):
                return await self._stream(
                    request=request,
                    job=job,
                    provider=provider,
                    response=response,
                    first_chunk=first_chunk,
                    record=record,
                )
            return await self._whole(job, provider, response, first_chunk, record)
        finally:
            _close(response)

    async def _whole(
        self,
        job: DispatchRequest,
        provider: Provider,
        response: aiohttp.ClientResponse,
        first_chunk: bytes,
        record: DispatchRecord,
    ) -> web.Response:
        """A non-streamed answer: read it whole (still before the client sees a byte)."""
        try:
            rest = await response.content.read(MAX_RESPONSE_BYTES - len(first_chunk) + 1)
            if len(first_chunk) + len(rest) > MAX_RESPONSE_BYTES:
                raise ValueError("response too large")
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            failure = RetryableAttemptError(
                "oversized_response" if isinstance(error, ValueError) else "payload_error",
                status=response.status,
            )
            self._failed(record, provider, failure)
            record.served = None
            raise failure from error
        body = first_chunk + rest
        self._health.succeeded(provider.name)
        record.attempts.append(Attempt(provider.name, "ok", response.status))
        record.status = response.status
        record.bytes_sent = len(body)
        headers = downstream_headers(response.headers)
        headers.update(job.response_headers(provider))
        headers["x-gateway-provider"] = provider.name
        return web.Response(status=response.status, body=body, headers=headers)

    async def _stream(
        self,
        *,
        request: web.Request,
        job: DispatchRequest,
        provider: Provider,
        response: aiohttp.ClientResponse,
        first_chunk: bytes,
        record: DispatchRecord,
    ) -> web.StreamResponse:
        """Pass an SSE stream through chunk by chunk; after the first byte nothing is retried."""
        headers = downstream_headers(response.headers)
        headers.update(job.response_headers(provider))
        headers["x-gateway-provider"] = provider.name
        downstream = web.StreamResponse(status=response.status, headers=headers)
        downstream.enable_chunked_encoding()
        record.status = response.status
        await downstream.prepare(request)
        last = b""
        chunk = first_chunk
        try:
            while chunk:
                await downstream.write(chunk)
                record.bytes_sent += len(chunk)
                last = chunk
                chunk = await response.content.readany()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The client went away: stop reading upstream (the caller closes it); not its fault.
            record.client_disconnected = True
            record.attempts.append(Attempt(provider.name, "client_disconnected", response.status))
            return downstream
        except (aiohttp.ClientError, TimeoutError):
            self._provider_failed(provider)
            record.attempts.append(Attempt(provider.name, "dropped_mid_stream", response.status))
            separator = b"" if last.endswith(b"\n\n") else b"\n\n"
            message = "The upstream stream ended unexpectedly; the response is incomplete."
            downstream.force_close()
            await _write_quietly(
                downstream, separator + sse_error_event(message, "upstream_dropped")
            )
            return downstream
        self._health.succeeded(provider.name)
        record.attempts.append(Attempt(provider.name, "ok", response.status))
        await downstream.write_eof()
        return downstream

    def _failed(
        self, record: DispatchRecord, provider: Provider, failure: RetryableAttemptError
    ) -> None:
        """Note a failed attempt, and let the provider's health learn from it."""
        record.attempts.append(
            Attempt(provider.name, failure.reason, failure.status, failure.retry_after)
        )
        if failure.status == 429:
            self._health.rate_limited(provider.name, failure.retry_after)
        else:
            self._provider_failed(provider)

    def _provider_failed(self, provider: Provider) -> None:
        if self._health.failed(provider.name):
            self._on_cooldown(provider.name)


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


def _close(response: aiohttp.ClientResponse | None) -> None:
    # An unfinished body must drop the connection (close), so an upstream that is still generating
    # sees the cancellation at once; a finished one goes back to the keep-alive pool (release).
    if response is None:
        return
    if response.content.is_eof():
        response.release()
    else:
        response.close()


async def _write_quietly(downstream: web.StreamResponse, data: bytes) -> None:
    try:
        await downstream.write(data)
        await downstream.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds; None when absent or a date."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _exhausted(record: DispatchRecord) -> GatewayError:
    """The error for a request whose every attempt failed, by what the failures share."""
    reasons = {attempt.outcome for attempt in record.attempts}
    summary = ", ".join(f"{attempt.provider}: {attempt.outcome}" for attempt in record.attempts)
    if reasons == {"timeout"}:
        return GatewayError(
            504, f"No upstream answered in time ({summary}).", "upstream_timeout", retry_after=1
        )
    if reasons == {"http_429"}:
        waits = [attempt.retry_after for attempt in record.attempts if attempt.retry_after]
        return GatewayError(
            429,
            f"Every upstream is rate limiting ({summary}).",
            "upstream_rate_limited",
            retry_after=min(waits) if waits else 1,
        )
    if reasons == {"connect_error"}:
        return GatewayError(
            503, f"No upstream could be reached ({summary}).", "upstream_unreachable", retry_after=1
        )
    return GatewayError(
        502, f"No upstream gave a usable answer ({summary}).", "upstream_error", retry_after=1
    )
