"""OpenAI wire shapes: response bodies, streamed chunks as SSE events, and errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import orjson

JSON_CONTENT_TYPE = "application/json"
# The context length the simulated node reports (`/v1/models`, `/tokenize`).
MAX_MODEL_LEN = 8192
SSE_CONTENT_TYPE = "text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """Frame one JSON payload as a server-sent event."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_body(
    message: str, error_type: str, code: str | int | None, param: str | None = None
) -> bytes:
    """An OpenAI-shaped error body (vLLM's: its `code` is the status)."""
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """An OpenAI usage block, with the prefix-cached part of the prompt as `cached_tokens`."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseShape(Protocol):
    """Builds one endpoint's response body and stream events for one request."""

    def body(self, texts: Sequence[str], finish_reason: str, usage: dict[str, Any]) -> bytes:
        """The non-streaming response: one choice per text."""
        ...

    def opening_events(self) -> list[bytes]:
        """Events sent with the first token, before it."""
        ...

    def token_event(self, choice: int, text: str) -> bytes:
        """The event carrying one token of one choice."""
        ...

    def closing_event(self, choice: int, finish_reason: str) -> bytes:
        """The event ending one choice."""
        ...

    def usage_event(self, usage: dict[str, Any]) -> bytes:
        """The final event carrying usage (sent only when the client asked for it)."""
        ...


class _Envelope:
    """The fields every chunk of one response repeats, serialized once per response."""

    def __init__(self, completion_id: str, created: int, model: str, chunk_object: str) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        # Chunks differ only in their choices, so every other field is serialized once here.
        self._head = (
            b'data: {"id":'
            + orjson.dumps(completion_id)
            + b',"object":'
            + orjson.dumps(chunk_object)
            + b',"created":'
            + orjson.dumps(created)
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":'
        )

    def event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        """One chunk as an SSE event; `usage` only on the usage event. Like vLLM (whose chunks
        leave unset fields out), other chunks carry no `usage` key, not even `null`, unless
        continuous usage stats are on, which the simulator does not do."""
        tail = (b',"usage":' + orjson.dumps(usage) + b"}\n\n") if usage is not None else b"}\n\n"
        return self._head + orjson.dumps(choices) + tail

    def serialized_event(self, choices: bytes) -> bytes:
        """One chunk as an SSE event, from its choices already serialized as a JSON array."""
        return self._head + choices + b"}\n\n"


class ChatShape:
    """Shapes of `/v1/chat/completions`."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        """Bind the fields every chunk repeats."""
        self._envelope = _Envelope(completion_id, created, model, "chat.completion.chunk")

    def body(self, texts: Sequence[str], finish_reason: str, usage: dict[str, Any]) -> bytes:
        """The `chat.completion` object."""
        envelope = self._envelope
        return orjson.dumps(
            {
                "id": envelope.completion_id,
                "object": "chat.completion",
                "created": envelope.created,
                "model": envelope.model,
                "choices": [
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                    for index, text in enumerate(texts)
                ],
                "usage": usage,
            }
        )

    def opening_events(self) -> list[bytes]:
        """The chunk announcing the assistant role."""
        return [self._chunk(0, {"role": "assistant", "content": ""}, None)]

    def token_event(self, choice: int, text: str) -> bytes:
        """A content delta."""
        return self._envelope.serialized_event(
            b'[{"index":%d,"delta":{"content":%b},"logprobs":null,"finish_reason":null}]'
            % (choice, orjson.dumps(text))
        )

    def closing_event(self, choice: int, finish_reason: str) -> bytes:
        """An empty delta with the finish reason."""
        return self._chunk(choice, {}, finish_reason)

    def usage_event(self, usage: dict[str, Any]) -> bytes:
        """A chunk with no choices and the usage."""
        return self._envelope.event([], usage)

    def _chunk(self, choice: int, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return self._envelope.event(
            [{"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )


class CompletionShape:
    """Shapes of the legacy `/v1/completions`."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        """Bind the fields every chunk repeats."""
        self._envelope = _Envelope(completion_id, created, model, "text_completion")

    def body(self, texts: Sequence[str], finish_reason: str, usage: dict[str, Any]) -> bytes:
        """The `text_completion` object."""
        envelope = self._envelope
        return orjson.dumps(
            {
                "id": envelope.completion_id,
                "object": "text_completion",
                "created": envelope.created,
                "model": envelope.model,
                "choices": [
                    {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
                    for index, text in enumerate(texts)
                ],
                "usage": usage,
            }
        )

    def opening_events(self) -> list[bytes]:
        """Legacy streams open with the first token itself."""
        return []

    def token_event(self, choice: int, text: str) -> bytes:
        """A text piece."""
        return self._envelope.serialized_event(
            b'[{"index":%d,"text":%b,"logprobs":null,"finish_reason":null}]'
            % (choice, orjson.dumps(text))
        )

    def closing_event(self, choice: int, finish_reason: str) -> bytes:
        """An empty text piece with the finish reason."""
        return self._chunk(choice, "", finish_reason)

    def usage_event(self, usage: dict[str, Any]) -> bytes:
        """A chunk with no choices and the usage."""
        return self._envelope.event([], usage)

    def _chunk(self, choice: int, text: str, finish_reason: str | None) -> bytes:
        return self._envelope.event(
            [{"index": choice, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        )


def model_card(model: str, created: int, owner: str) -> dict[str, object]:
    """One model as vLLM lists it: its path as `root`, no `parent` (not an adapter), and the
    context length."""
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": owner,
        "root": model,
        "parent": None,
        "max_model_len": MAX_MODEL_LEN,
    }
