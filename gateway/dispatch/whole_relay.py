"""A non-streamed answer: read whole within the worker's answer budget, then sent in one piece."""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web

from gateway.catalog import Provider
from gateway.dispatch.delivery import whole_answer
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.job import DispatchRecord, DispatchRequest
from gateway.dispatch.outcomes import Attempt, UpstreamErrorAnswer
from gateway.dispatch.renamer import Renamer
from gateway.dispatch.upstream import is_success, read_rest
from gateway.dispatch.upstream_response import UpstreamResponse
from gateway.dispatch.usage import usage_from_body

# A non-streamed answer is held in memory before it is sent; beyond this it is refused.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


async def read_whole(
    response: UpstreamResponse, first_chunk: bytes, record: DispatchRecord
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


def relay_whole(
    job: DispatchRequest,
    provider: Provider,
    response: UpstreamResponse,
    body: bytearray,
    record: DispatchRecord,
    *,
    health: ProviderHealth,
) -> web.Response:
    """Answer the client with a non-streamed answer that was read and checked whole."""
    health.succeeded(provider.name)
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
        answer = relayable(
            UpstreamErrorAnswer(response.status, None, bytes(body)), renamer, provider
        ).body
    record.bytes_sent = len(answer)
    return whole_answer(response.status, answer, job.answer_headers(provider, response))


def relayable(
    answer: UpstreamErrorAnswer, renamer: Renamer | None, provider: Provider
) -> UpstreamErrorAnswer:
    """An upstream error answer as the client may see it: the upstream model id renamed, and
    never the provider's credential (an error may echo what the upstream received)."""
    body = renamer.error(answer.body) if renamer is not None else answer.body
    redactor = provider.redactor
    return replace(
        answer, body=redactor.redact(bytes(body)) if redactor is not None else bytes(body)
    )
