"""`/v1/responses` as vLLM serves it: a response is stored on the node that created it, and only
that node can continue it (`previous_response_id`), show it or delete it."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from gateway.simulator.extras import (
    RESPONSE_WORDS,
    begin,
    error_answer,
    finish,
    json_answer,
    unreadable_is_400,
    word_tokens,
)
from gateway.simulator.openai_shapes import SSE_CONTENT_TYPE
from gateway.simulator.state import STATE_KEY
from gateway.simulator.stats import Outcome, RequestRecord

STORED_RESPONSES_LIMIT = 10_000


def _not_found(response_id: str) -> web.Response:
    return error_answer(
        404, f"Response with id '{response_id}' not found.", "invalid_request_error", None
    )


def _input_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(
            str(item.get("content", "")) if isinstance(item, dict) else str(item) for item in value
        )
    return ""


@unreadable_is_400
async def create(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses`: answer, store (unless `store` is false), and stream if asked."""
    state, record, data, refusal = await begin(request)
    if refusal is not None:
        return finish(state, record, refusal)
    stored = state.responses
    previous = data.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or previous not in stored):
        return finish(state, record, _not_found(str(previous)))
    number = len(stored) + 1
    # As vLLM does, a client's `request_id` becomes the response's id.
    chosen = data.get("request_id")
    response_id = (
        chosen
        if isinstance(chosen, str) and chosen
        else f"resp_{state.options.name}_{record.request_id.rsplit('-', 1)[-1]}"
    )
    text = " ".join(RESPONSE_WORDS) + f" {number}"
    input_tokens = len(word_tokens(_input_text(data.get("input"))))
    response = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": data["model"],
        "status": "completed",
        "previous_response_id": previous,
        "output": [
            {
                "type": "message",
                "id": f"msg_{response_id}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(RESPONSE_WORDS) + 1,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + len(RESPONSE_WORDS) + 1,
        },
    }
    if data.get("store", True) and len(stored) < STORED_RESPONSES_LIMIT:
        stored[response_id] = response
    if not data.get("stream"):
        return finish(state, record, json_answer(response))
    return await _stream(request, response, text, record)


def stream_events(response: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """A response's events in vLLM's order (what the SDK's `responses.stream()` helper builds
    its state from): created, in_progress, the message item and its text part added, one
    delta per word, the text, part and item done, completed."""
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    item_id = f"msg_{response['id']}"
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    message = {"type": "message", "id": item_id, "role": "assistant"}
    part = {"type": "output_text", "annotations": [], "logprobs": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
    ]
    events.extend(
        {
            "type": "response.output_text.delta",
            **where,
            "delta": word if index == 0 else f" {word}",
            "logprobs": [],
        }
        for index, word in enumerate(text.split())
    )
    done_part = {**part, "text": text}
    events += [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": done_part},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {**message, "status": "completed", "content": [done_part]},
        },
        {"type": "response.completed", "response": response},
    ]
    return events


async def _stream(
    request: web.Request, response: dict[str, Any], text: str, record: RequestRecord
) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    stream = web.StreamResponse(
        headers={"Content-Type": SSE_CONTENT_TYPE, "x-request-id": record.request_id}
    )
    await stream.prepare(request)
    for number, event in enumerate(stream_events(response, text)):
        payload = orjson.dumps({**event, "sequence_number": number})
        await stream.write(f"event: {event['type']}\n".encode() + b"data: " + payload + b"\n\n")
    await stream.write_eof()
    state.stats.completion_finished(record, Outcome.COMPLETED, 200)
    return stream


@unreadable_is_400
async def retrieve(request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses/{id}`: a response stored on this node; `?stream=true` replays it as
    events."""
    state, record, _, refusal = await begin(request, body=False)
    if refusal is not None:
        return finish(state, record, refusal)
    response_id = request.match_info["response_id"]
    stored = state.responses.get(response_id)
    if stored is None:
        return finish(state, record, _not_found(response_id))
    if request.query.get("stream") == "true":
        text = stored["output"][0]["content"][0]["text"]
        return await _stream(request, stored, text, record)
    return finish(state, record, json_answer(stored))


@unreadable_is_400
async def delete(request: web.Request) -> web.Response:
    """`DELETE /v1/responses/{id}`: forget a response stored on this node."""
    state, record, _, refusal = await begin(request, body=False)
    if refusal is not None:
        return finish(state, record, refusal)
    response_id = request.match_info["response_id"]
    if state.responses.pop(response_id, None) is None:
        return finish(state, record, _not_found(response_id))
    answer = json_answer({"id": response_id, "object": "response", "deleted": True})
    return finish(state, record, answer)
