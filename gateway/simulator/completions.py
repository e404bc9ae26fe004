"""The completion endpoints: faults first, then a scheduled, timed, OpenAI-shaped answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from aiohttp import web

from gateway.simulator.completion_request import (
    CompletionRequest,
    Endpoint,
    InvalidParameterError,
    InvalidRequestError,
    parse_completion_request,
)
from gateway.simulator.completion_text import completion_tokens
from gateway.simulator.engine import Sequence
from gateway.simulator.hostile import continue_hostile_body, fixed_hostile_response
from gateway.simulator.openai_shapes import (
    DONE_EVENT,
    JSON_CONTENT_TYPE,
    SSE_CONTENT_TYPE,
    ChatShape,
    CompletionShape,
    ResponseShape,
    error_body,
    usage,
)
from gateway.simulator.options import Mode
from gateway.simulator.prompts import reply_block
from gateway.simulator.state import STATE_KEY, SimulatorState
from gateway.simulator.stats import Outcome, RequestRecord

REQUEST_ID_HEADER = "x-simulator-request-id"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Serve `POST /v1/chat/completions`."""
    return await _serve(request, Endpoint.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    """Serve the legacy `POST /v1/completions`."""
    return await _serve(request, Endpoint.COMPLETION)


async def _serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    number = state.next_request_number()
    record = RequestRecord(
        f"{state.options.name}-{number}", request.method, request.path, request.raw_headers
    )
    stats = state.stats
    stats.completion_started(record)
    try:
        record.body = await request.read()
        return await _answer(request, state, endpoint, record, number)
    except (asyncio.CancelledError, ConnectionError):
        # With handler cancellation on, a client that goes away cancels this task.
        stats.completion_finished(record, Outcome.CANCELLED, None)
        raise
    except Exception:
        stats.completion_finished(record, Outcome.ERROR, 500)
        raise


async def _answer(
    request: web.Request,
    state: SimulatorState,
    endpoint: Endpoint,
    record: RequestRecord,
    number: int,
) -> web.StreamResponse:
    faults = state.faults
    headers = {REQUEST_ID_HEADER: record.request_id, "x-request-id": record.request_id}
    if faults.rate_limit_retry_after is not None:
        headers["Retry-After"] = str(faults.rate_limit_retry_after)
        body = error_body("Simulated rate limit.", "rate_limit_error", "rate_limit_exceeded")
        return await _send_error(
            request,
            state,
            record,
            outcome=Outcome.RATE_LIMITED,
            status=429,
            body=body,
            headers=headers,
        )
    poisoned = faults.error_on_text is not None and faults.error_on_text.encode() in record.body
    if poisoned or (faults.error_rate > 0.0 and state.random.random() < faults.error_rate):
        body = error_body("Simulated upstream failure.", "server_error", "simulated_error")
        return await _send_error(
            request, state, record, outcome=Outcome.ERROR, status=500, body=body, headers=headers
        )
    try:
        parsed = parse_completion_request(record.body, endpoint, state.options.default_max_tokens)
    except InvalidParameterError as error:
        body = error_body(str(error), "BadRequestError", 400, error.param)
        return await _send_error(
            request, state, record, outcome=Outcome.REJECTED, status=400, body=body, headers=headers
        )
    except InvalidRequestError as error:
        body = error_body(str(error), "invalid_request_error", None)
        return await _send_error(
            request, state, record, outcome=Outcome.REJECTED, status=400, body=body, headers=headers
        )
    if not state.serves(parsed.model):
        message = f"The model `{parsed.model}` does not exist."
        body = error_body(message, "NotFoundError", "model_not_found")
        return await _send_error(
            request, state, record, outcome=Outcome.REJECTED, status=404, body=body, headers=headers
        )
    state.remember_model(parsed.model)
    if faults.mode is not Mode.NORMAL:
        return await _hostile(
            request, state, record, mode=faults.mode, stream=parsed.stream, headers=headers
        )
    tokens = completion_tokens(state.options.name, number, parsed.max_tokens)
    sequence = await state.engine.start(parsed.prompt, parsed.max_tokens, faults.slow)
    try:
        reply = _Reply(state=state, parsed=parsed, sequence=sequence, record=record, tokens=tokens)
        if parsed.stream:
            return await reply.stream(request, headers)
        return await reply.whole(request, headers)
    finally:
        completed = record.outcome == Outcome.COMPLETED
        sequence.finish(_finish_reason(parsed) if completed else "abort")


def _finish_reason(parsed: CompletionRequest) -> str:
    """Output always runs to its length: "length" when the client set it, else "stop"."""
    return "length" if parsed.max_tokens_given else "stop"


async def _send_whole(request: web.Request, response: web.Response) -> bool:
    """Send `response` completely now; False when the client went away while it was written."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        return False
    return True


async def _send_error(
    request: web.Request,
    state: SimulatorState,
    record: RequestRecord,
    *,
    outcome: str,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
) -> web.Response:
    response = web.Response(
        status=status, body=body, content_type=JSON_CONTENT_TYPE, headers=headers
    )
    sent = await _send_whole(request, response)
    state.stats.completion_finished(record, outcome if sent else Outcome.CANCELLED, status)
    return response


async def _hostile(
    request: web.Request,
    state: SimulatorState,
    record: RequestRecord,
    *,
    mode: Mode,
    stream: bool,
    headers: Mapping[str, str],
) -> web.StreamResponse:
    fixed = fixed_hostile_response(mode, stream, headers)
    if fixed is not None:
        sent = await _send_whole(request, fixed)
        state.stats.completion_finished(
            record, Outcome.HOSTILE if sent else Outcome.CANCELLED, fixed.status
        )
        return fixed
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = SSE_CONTENT_TYPE if stream else JSON_CONTENT_TYPE
    try:
        await response.prepare(request)
        await continue_hostile_body(response, mode)
    except ConnectionError:
        state.stats.completion_finished(record, Outcome.CANCELLED, None)
    return response


class _Reply:
    """One normal answer: the parsed request, its running sequence, its record and its tokens."""

    def __init__(
        self,
        *,
        state: SimulatorState,
        parsed: CompletionRequest,
        sequence: Sequence,
        record: RequestRecord,
        tokens: list[str],
    ) -> None:
        self.state = state
        self.parsed = parsed
        self.sequence = sequence
        self.record = record
        self.tokens = tokens
        self.choices = len(parsed.prompt.chains)
        self.finish_reason = _finish_reason(parsed)
        record.prompt_tokens = sequence.prompt_tokens
        record.cached_tokens = sequence.cached_tokens
        created = int(time.time())
        self.shape: ResponseShape
        if parsed.endpoint is Endpoint.CHAT:
            completion_id = f"chatcmpl-{record.request_id}"
            self.shape = ChatShape(completion_id, created, parsed.model)
        else:
            completion_id = f"cmpl-{record.request_id}"
            self.shape = CompletionShape(completion_id, created, parsed.model)

    async def whole(self, request: web.Request, headers: Mapping[str, str]) -> web.Response:
        """Wait for the last token, then send the complete response."""
        sequence, record = self.sequence, self.record
        await sequence.wait_for_token(len(self.tokens) - 1)
        record.first_token_at = sequence.due_at(0)
        record.generation_finished_at = time.monotonic()
        sequence.produced_tokens = len(self.tokens) * self.choices
        body = self.shape.body(
            ["".join(self.tokens)] * self.choices,
            self.finish_reason,
            usage(sequence.prompt_tokens, sequence.produced_tokens, sequence.cached_tokens),
        )
        response = web.Response(body=body, content_type=JSON_CONTENT_TYPE, headers=headers)
        sent = await _send_whole(request, response)
        if sent:
            self._completed()
        else:
            self.state.stats.completion_finished(record, Outcome.CANCELLED, 200)
        return response

    async def stream(self, request: web.Request, headers: Mapping[str, str]) -> web.StreamResponse:
        """Send each event when its token is due; events due together leave in one write."""
        response = web.StreamResponse(status=200, headers=headers)
        response.headers["Content-Type"] = SSE_CONTENT_TYPE
        response.headers["Cache-Control"] = "no-cache"
        try:
            await response.prepare(request)
            await self._write_events(request, response)
        except ConnectionError:
            self.state.stats.completion_finished(self.record, Outcome.CANCELLED, None)
        return response

    async def _write_events(self, request: web.Request, response: web.StreamResponse) -> None:
        sequence, record = self.sequence, self.record
        last_index = len(self.tokens) - 1
        drop_after = self.state.faults.drop_after_chunks
        events = self._events()
        if sequence.seconds_until_token(last_index) <= 0.0:
            # Every token is already due (zero latency): one write and no clock reads per event.
            sequence.produced_tokens = len(self.tokens) * self.choices
            record.first_token_at = record.generation_finished_at = time.monotonic()
            if drop_after is not None and drop_after < len(events):
                await self._drop(request, response, [event for _, event in events[:drop_after]])
                return
            await response.write(b"".join(event for _, event in events))
            self._completed()
            return
        pending: list[bytes] = []
        reached = -1
        for written, (due, event) in enumerate(events):
            if due > reached:
                if sequence.seconds_until_token(due) > 0.0:
                    # Flush what is ready before pausing, so the client sees each token on time.
                    if pending:
                        await response.write(b"".join(pending))
                        pending.clear()
                    await sequence.wait_for_token(due)
                reached = due
                sequence.produced_tokens = (due + 1) * self.choices
                now = time.monotonic()
                if due == 0:
                    record.first_token_at = now
                if due == last_index:
                    record.generation_finished_at = now
            if written == drop_after:
                await self._drop(request, response, pending)
                return
            pending.append(event)
        await response.write(b"".join(pending))
        self._completed()

    async def _drop(
        self, request: web.Request, response: web.StreamResponse, ready: list[bytes]
    ) -> None:
        """Send the events that are ready, then abort the connection mid-stream."""
        if ready:
            await response.write(b"".join(ready))
        self.state.stats.completion_finished(self.record, Outcome.DROPPED, 200)
        if request.transport is not None:
            request.transport.abort()

    def _completed(self) -> None:
        self.state.stats.completion_finished(self.record, Outcome.COMPLETED, 200)
        if self.parsed.endpoint is Endpoint.CHAT:
            prompt = self.parsed.prompt
            reply = reply_block(prompt, "".join(self.tokens))
            self.state.engine.remember((*prompt.chains[0], reply))

    def _events(self) -> list[tuple[int, bytes]]:
        """Every SSE event of the stream, each with the index of the token it waits for."""
        shape, choices = self.shape, self.choices
        last_index = len(self.tokens) - 1
        events = [(0, event) for event in shape.opening_events()]
        for index, text in enumerate(self.tokens):
            events.extend((index, shape.token_event(choice, text)) for choice in range(choices))
        events.extend(
            (last_index, shape.closing_event(choice, self.finish_reason))
            for choice in range(choices)
        )
        if self.parsed.include_usage:
            total = len(self.tokens) * choices
            sequence = self.sequence
            events.append(
                (
                    last_index,
                    shape.usage_event(usage(sequence.prompt_tokens, total, sequence.cached_tokens)),
                )
            )
        events.append((last_index, DONE_EVENT))
        return events
