"""The client's JSON body: parsed once, checked for what routing needs, rewritten only if needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.edge.errors import GatewayError
from gateway.edge.model_splice import replace_model

# What a JSON body must hold besides `model`: chat messages, a completion prompt, or nothing.
Endpoint = Literal["chat", "completions", "model"]


@dataclass(frozen=True)
class Payload:
    """A validated request body: the raw bytes, the parsed object, and the fields routing reads."""

    raw: bytes
    data: dict[str, Any]
    model: str
    stream: bool

    def for_upstream(self, upstream_model: str) -> bytes:
        """The body to send upstream: the client's bytes, with only the model id spliced in when
        it differs (no other byte changes, so big integers and key order survive)."""
        if upstream_model == self.model:
            return self.raw
        return replace_model(self.raw, upstream_model)


def parse_payload(raw: bytes, endpoint: Endpoint) -> Payload:
    """Parse and check a request body; raise a 400 GatewayError naming the offending field."""
    if not raw.strip():
        raise GatewayError(400, "The request body is empty; send a JSON object.", "invalid_json")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "The request body must be a JSON object.", "invalid_request")

    model = data.get("model")
    if model is None:
        raise GatewayError(
            400, "You must provide a model parameter.", "missing_field", param="model"
        )
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(
            400, "`model` must be a non-empty string.", "invalid_type", param="model"
        )

    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise GatewayError(400, "`stream` must be a boolean.", "invalid_type", param="stream")

    if endpoint == "chat":
        messages = data.get("messages")
        if messages is None:
            raise GatewayError(
                400, "You must provide a messages parameter.", "missing_field", param="messages"
            )
        if not isinstance(messages, list) or not messages:
            raise GatewayError(
                400, "`messages` must be a non-empty array.", "invalid_type", param="messages"
            )
        if not all(isinstance(message, dict) for message in messages):
            raise GatewayError(
                400, "Each entry of `messages` must be an object.", "invalid_type", param="messages"
            )
    elif endpoint == "completions":
        prompt = data.get("prompt")
        if prompt is None:
            raise GatewayError(
                400, "You must provide a prompt parameter.", "missing_field", param="prompt"
            )
        if not isinstance(prompt, str | list):
            raise GatewayError(
                400, "`prompt` must be a string or an array.", "invalid_type", param="prompt"
            )
    return Payload(raw=raw, data=data, model=model, stream=stream)
