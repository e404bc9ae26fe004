"""A streamed answer relayed chunk by chunk once its first byte is in: from there nothing is
retried, and a stream that breaks ends with an OpenAI-style error event."""

from __future__ import annotations

import contextlib

import aiohttp
from aiohttp import web

from gateway.catalog import Provider
from gateway.dispatch.blame import RequestBlame
from gateway.dispatch.delivery import (
    ClientStalledError,
    HeldHeadResponse,
    end_incomplete,
    write_last,
    write_within,
)
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.job import DispatchRecord, DispatchRequest
from gateway.dispatch.outcomes import Attempt
from gateway.dispatch.upstream import EventStreamFraming
from gateway.dispatch.upstream_errors import UpstreamError
from gateway.dispatch.upstream_response import UpstreamResponse
from gateway.dispatch.usage import StreamUsage
from gateway.shared.errors import sse_error_event


async def relay_stream(
    *,
    request: web.Request,
    job: DispatchRequest,
    provider: Provider,
    response: UpstreamResponse,
    first_chunk: bytes,
    record: DispatchRecord,
    blame: RequestBlame,
    health: ProviderHealth,
    write_timeout: float,
) -> web.StreamResponse:
    """Pass an SSE stream through chunk by chunk; after the first byte nothing is retried.

    A stream that breaks, or has an event past MAX_SSE_EVENT_BYTES, ends with an OpenAI-style
    error event; a stream that ends cleanly passes through as it is, `[DONE]` or not.
    """
    headers = job.answer_headers(provider, response)
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
                return await _end_broken_stream(
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
                await write_within(request, downstream, chunk, write_timeout, head=head)
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
            ended = await write_last(request, downstream, chunk, write_timeout, head=head)
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
        return await _end_broken_stream(
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
    health.succeeded(provider.name)
    record.attempts.append(Attempt(provider.name, "ok", response.status))
    if not ended:
        await downstream.write_eof()
    return downstream


async def _end_broken_stream(
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
