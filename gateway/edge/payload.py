"""The client's JSON body: parsed once, checked for what routing needs, rewritten only if needed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.edge.model_splice import replace_model
from gateway.shared.errors import GatewayError

# What a JSON body must hold besides `model`: chat messages, a completion prompt, or nothing.
Endpoint = Literal["chat", "completions", "model"]


@dataclass(frozen=True)
class Payload:
    """A validated request body: the raw bytes, the parsed object, and the fields routing reads."""

    raw: bytes
    data: dict[str, Any]
    model: str | None  # None: the endpoint allows leaving it out, and the body did
    stream: bool
    # Where `model`'s value lies in `raw`, when found already (a body parsed in the helper);
    # None: found at the splice, if one is needed.
    model_span: tuple[int, int] | None = None

    def for_upstream(self, upstream_model: str) -> bytes:
        """The body to send upstream: the client's bytes, with only the model id spliced in when
        it differs or is missing (no other byte changes, so big integers and key order
        survive)."""
        if upstream_model == self.model:
            return self.raw
        return replace_model(self.raw, upstream_model, span=self.model_span)


def _parsed(raw: bytes) -> Any:
    """The body as JSON; `NaN`, `Infinity` and `-Infinity` are accepted (read as null here).

    vLLM parses bodies with Python's `json`, which takes these constants and leaves a value the
    engine refuses with its own parameter message: the body goes on unchanged so the node can.
    Anything else orjson refuses (broken syntax, invalid UTF-8, lone surrogates) stays a 400.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=lambda constant: None)
        orjson.dumps(data)  # what is left must be what orjson would have read
    except (UnicodeDecodeError, ValueError, orjson.JSONEncodeError, RecursionError):
        raise GatewayError(400, "The request body is not valid JSON.", "invalid_json") from None
    return data


def parse_payload(raw: bytes, endpoint: Endpoint, *, model_optional: bool = False) -> Payload:
    """Parse and check a request body; raise a 400 GatewayError naming the offending field.
    With `model_optional`, a body without `model` is valid (its `model` is None)."""
    if not raw.strip():
        raise GatewayError(400, "The request body is empty; send a JSON object.", "invalid_json")
    data = _parsed(raw)
    if not isinstance(data, dict):
        raise GatewayError(400, "The request body must be a JSON object.", "invalid_request")

    model = data.get("model")
    if model is None and not model_optional:
        raise GatewayError(
            400, "You must provide a model parameter.", "missing_field", param="model"
        )
    if model is not None and (not isinstance(model, str) or not model.strip()):
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
        # An empty array is the engine's to judge (vLLM takes it): only the shape is checked.
        if not isinstance(messages, list):
            raise GatewayError(
                400, "`messages` must be an array.", "invalid_type", param="messages"
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
