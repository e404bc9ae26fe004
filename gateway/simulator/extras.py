"""The vLLM endpoints beyond completions: embeddings, rerank, score, tokenize, detokenize,
transcriptions, one model, and stored Responses (kept on this node only, as vLLM does).

Answers are deterministic functions of the request, shaped like vLLM's; faults that answer
before any work (rate limit, error rate) apply here as to completions.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from gateway.simulator.openai_shapes import (
    JSON_CONTENT_TYPE,
    MAX_MODEL_LEN,
    error_body,
    model_card,
)
from gateway.simulator.state import STATE_KEY, SimulatorState
from gateway.simulator.stats import Outcome, RequestRecord

EMBEDDING_DIMENSIONS = 8
RESPONSE_WORDS = ("stored", "answer", "from", "this", "node")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def unreadable_is_400(handler: Handler) -> Handler:
    """A request the node cannot make sense of gets a 400, as vLLM's validation answers."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as error:  # noqa: BLE001 - whatever the node cannot read is a 400
            message = f"Invalid request: {type(error).__name__}."
            return error_answer(400, message, "BadRequestError")

    return guarded


def json_answer(payload: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=JSON_CONTENT_TYPE, headers=headers
    )


def error_answer(
    status: int, message: str, error_type: str, code: str | None = None
) -> web.Response:
    return web.Response(
        status=status, body=error_body(message, error_type, code), content_type=JSON_CONTENT_TYPE
    )


def word_tokens(text: str) -> list[int]:
    """One token per whitespace-separated word, numbered by a stable hash."""
    return [int.from_bytes(hashlib.sha256(word.encode()).digest()[:2]) for word in text.split()]


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((byte - 128) / 128, 6) for byte in digest[:EMBEDDING_DIMENSIONS]]


def _score(first: str, second: str) -> float:
    shared = set(first.lower().split()) & set(second.lower().split())
    return round(len(shared) / (1 + len(set(second.lower().split()))), 6)


async def begin(
    request: web.Request, *, body: bool = True
) -> tuple[SimulatorState, RequestRecord, Any, web.Response | None]:
    """Record the request, apply the early faults and parse its JSON body (when it has one)."""
    state = request.app[STATE_KEY]
    number = state.next_request_number()
    record = RequestRecord(
        f"{state.options.name}-{number}", request.method, request.path, request.raw_headers
    )
    state.stats.completion_started(record)
    if body:
        record.body = await request.read()
    faults = state.faults
    if faults.rate_limit_retry_after is not None:
        refusal = error_answer(
            429, "Simulated rate limit.", "rate_limit_error", "rate_limit_exceeded"
        )
        refusal.headers["Retry-After"] = str(faults.rate_limit_retry_after)
        return state, record, None, refusal
    if faults.error_rate > 0.0 and state.random.random() < faults.error_rate:
        return state, record, None, error_answer(500, "Simulated upstream failure.", "server_error")
    if not body or request.content_type != JSON_CONTENT_TYPE:
        return state, record, None, None
    try:
        data = orjson.loads(record.body)
    except orjson.JSONDecodeError:
        return state, record, None, error_answer(400, "Invalid JSON body.", "invalid_request_error")
    if not isinstance(data, dict):
        return (
            state,
            record,
            None,
            error_answer(400, "The body must be an object.", "BadRequestError"),
        )
    model = data.get("model")
    if isinstance(model, str) and not state.serves(model):
        message = f"The model `{model}` does not exist."
        return state, record, None, error_answer(404, message, "NotFoundError", "model_not_found")
    return state, record, data, None


def finish(state: SimulatorState, record: RequestRecord, response: web.Response) -> web.Response:
    outcome = Outcome.COMPLETED if response.status < 400 else Outcome.REJECTED
    state.stats.completion_finished(record, outcome, response.status)
    response.headers["x-request-id"] = record.request_id
    return response


@unreadable_is_400
async def model(request: web.Request) -> web.Response:
    """`GET /v1/models/{id}`."""
    state = request.app[STATE_KEY]
    state.stats.count_path("/v1/models/{id}")
    name = request.match_info["model"]
    if not state.serves(name) or (not state.options.models and name not in state.models_seen):
        return error_answer(404, f"The model `{name}` does not exist.", "NotFoundError")
    return json_answer(model_card(name, 0, state.options.name))


@unreadable_is_400
async def embeddings(request: web.Request) -> web.Response:
    """`POST /v1/embeddings`: one deterministic vector per input, as floats or base64."""
    state, record, data, refusal = await begin(request)
    if refusal is not None:
        return finish(state, record, refusal)
    inputs = data.get("input")
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        answer = error_answer(400, "`input` must be a string or strings.", "BadRequestError")
        return finish(state, record, answer)
    encoded = data.get("encoding_format") == "base64"
    items = []
    for index, text in enumerate(texts):
        vector = _vector(text)
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if encoded
            else vector
        )
        items.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(len(word_tokens(text)) for text in texts)
    payload = {
        "id": f"embd-{record.request_id}",
        "object": "list",
        "created": int(time.time()),
        "model": data["model"],
        "data": items,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }
    return finish(state, record, json_answer(payload))


@unreadable_is_400
async def rerank(request: web.Request) -> web.Response:
    """`POST /v1/rerank`: documents by word overlap with the query, best first."""
    state, record, data, refusal = await begin(request)
    if refusal is not None:
        return finish(state, record, refusal)
    query, documents = data.get("query"), data.get("documents")
    if not isinstance(query, str) or not isinstance(documents, list):
        answer = error_answer(400, "`query` and `documents` are required.", "BadRequestError")
        return finish(state, record, answer)
    results = sorted(
        (
            {"index": index, "document": {"text": text}, "relevance_score": _score(query, text)}
            for index, text in enumerate(map(str, documents))
        ),
        key=lambda result: -float(result["relevance_score"]),  # type: ignore[arg-type]
    )
    top = data.get("top_n")
    payload = {
        "id": f"rerank-{record.request_id}",
        "model": data["model"],
        "usage": {"total_tokens": len(word_tokens(query))},
        "results": results[:top] if isinstance(top, int) and top > 0 else results,
    }
    return finish(state, record, json_answer(payload))


@unreadable_is_400
async def score(request: web.Request) -> web.Response:
    """`POST /v1/score`: `text_1` against each of `text_2`."""
    state, record, data, refusal = await begin(request)
    if refusal is not None:
        return finish(state, record, refusal)
    first, second = data.get("text_1"), data.get("text_2")
    seconds = [second] if isinstance(second, str) else second
    if not isinstance(first, str) or not isinstance(seconds, list):
        answer = error_answer(400, "`text_1` and `text_2` are required.", "BadRequestError")
        return finish(state, record, answer)
    payload = {
        "id": f"score-{record.request_id}",
        "object": "list",
        "created": int(time.time()),
        "model": data["model"],
        "data": [
            {"index": index, "object": "score", "score": _score(first, str(text))}
            for index, text in enumerate(seconds)
        ],
        "usage": {
            "prompt_tokens": len(word_tokens(first)),
            "total_tokens": len(word_tokens(first)),
        },
    }
    return finish(state, record, json_answer(payload))


@unreadable_is_400
async def tokenize(request: web.Request) -> web.Response:
    """`POST /tokenize`: one token per word."""
    state, record, data, refusal = await begin(request)
    if refusal is not None:
        return finish(state, record, refusal)
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        return finish(state, record, error_answer(400, "`prompt` is required.", "BadRequestError"))
    tokens = word_tokens(prompt)
    payload = {
        "count": len(tokens),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": tokens,
        "token_strs": None,
    }
    return finish(state, record, json_answer(payload))


@unreadable_is_400
async def detokenize(request: web.Request) -> web.Response:
    """`POST /detokenize`: each token back as `t<number>`."""
    state, record, data, refusal = await begin(request)
    if refusal is not None:
        return finish(state, record, refusal)
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(token, int) for token in tokens):
        return finish(state, record, error_answer(400, "`tokens` is required.", "BadRequestError"))
    return finish(state, record, json_answer({"prompt": " ".join(f"t{token}" for token in tokens)}))


@unreadable_is_400
async def transcriptions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/audio/transcriptions` (multipart): the file's size and the model, as text; with
    `stream=true`, as `transcript.text.delta` events, a `transcript.text.done` and `[DONE]`."""
    state, record, _, refusal = await begin(request, body=False)
    if refusal is not None:
        return finish(state, record, refusal)
    fields: dict[str, str] = {}
    audio = b""
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name is None:
            continue
        value = await part.read()
        if part.name == "file":
            audio = bytes(value)
        else:
            fields[part.name] = bytes(value).decode()
    # What the node saw, for tests: the form's fields, and the file by its size.
    record.body = orjson.dumps({**fields, "file_bytes": len(audio)})
    model_name = fields.get("model", "")
    if not audio or not model_name:
        return finish(
            state, record, error_answer(400, "`file` and `model` are required.", "BadRequest")
        )
    if not state.serves(model_name):
        answer = error_answer(404, f"The model `{model_name}` does not exist.", "NotFoundError")
        return finish(state, record, answer)
    text = f"{len(audio)} bytes of audio transcribed by {state.options.name}"
    if fields.get("stream", "").strip().lower() == "true":
        return await _transcript_stream(request, state, record, text)
    return finish(state, record, json_answer({"text": text}))


async def _transcript_stream(
    request: web.Request, state: SimulatorState, record: RequestRecord, text: str
) -> web.StreamResponse:
    """A transcript as server-sent events, one word per delta, as OpenAI's API streams it."""
    events: list[dict[str, Any]] = [
        {"type": "transcript.text.delta", "delta": word if index == 0 else f" {word}"}
        for index, word in enumerate(text.split())
    ]
    events.append({"type": "transcript.text.done", "text": text})
    stream = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "x-request-id": record.request_id}
    )
    await stream.prepare(request)
    for event in events:
        await stream.write(b"data: " + orjson.dumps(event) + b"\n\n")
    await stream.write(b"data: [DONE]\n\n")
    await stream.write_eof()
    state.stats.completion_finished(record, Outcome.COMPLETED, 200)
    return stream
