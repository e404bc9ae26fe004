"""One attempt at one provider: the request sent within its deadline, a failure before anything
reached the client noted and raised for failover, an answer handed to its relay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import NoReturn

import structlog
from aiohttp import web

from gateway.catalog import Provider, Timeouts
from gateway.dispatch.blame import RequestBlame
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.job import DispatchRecord, DispatchRequest
from gateway.dispatch.outcomes import Attempt, RetryableAttemptError, failed_status, outcome_of
from gateway.dispatch.retries import RetrySlot
from gateway.dispatch.stream_relay import relay_stream
from gateway.dispatch.upstream import (
    close_response,
    is_success,
    read_opening,
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
from gateway.dispatch.whole_relay import read_whole, relay_whole, relayable
from gateway.shared.errors import GatewayError

logger = structlog.get_logger("gateway.dispatch.attempt")


class Attempts:
    """Makes one attempt of a request at one provider, for the failover loop."""

    def __init__(
        self,
        client: UpstreamPool,
        health: ProviderHealth,
        *,
        dropped_headers: frozenset[str],
        max_first_event_bytes: int,
        write_timeout: float,
    ) -> None:
        self._client = client
        self._health = health
        self._dropped_headers = dropped_headers
        self._max_first_event_bytes = max_first_event_bytes
        self._write_timeout = write_timeout

    async def make(
        self,
        request: web.Request,
        job: DispatchRequest,
        provider: Provider,
        record: DispatchRecord,
        blame: RequestBlame,
        *,
        retry: RetrySlot | None,
    ) -> web.StreamResponse:
        """Answer the client from `provider`, or raise RetryableAttemptError (the next provider
        may be tried) or GatewayError (no provider is tried after this one).

        The answer's opening (a stream's first event, or a whole non-streamed answer) is read
        within the attempt's deadline and checked before the client sees a byte; a retry's
        place in the budget is given back once the provider answered.
        """
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
                    whole = await read_whole(response, first_chunk, record)
            if not usable_answer(response, stream, first_chunk, whole):
                raise RetryableAttemptError("invalid_response", status=response.status)
        except RetryableAttemptError as failure:
            close_response(response)
            self._upload_failed(job)
            if failure.answer is not None:
                failure.answer = relayable(failure.answer, job.renamer(provider), provider)
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
                return await relay_stream(
                    request=request,
                    job=job,
                    provider=provider,
                    response=response,
                    first_chunk=first_chunk,
                    record=record,
                    blame=blame,
                    health=self._health,
                    write_timeout=self._write_timeout,
                )
            return relay_whole(job, provider, response, whole, record, health=self._health)
        finally:
            close_response(response)

    @staticmethod
    def _upload_failed(job: DispatchRequest) -> None:
        """A failed attempt whose cause is the client's upload (too large, too slow) is the
        client's error, not the provider's."""
        failure = job.body_failure()
        if failure is not None:
            raise failure

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
