"""Parse and validate the JSON body of a chat or legacy completion request."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.simulator.prompts import Prompt, PromptError, chat_prompt, completion_prompt


class Endpoint(enum.Enum):
    """The two completion endpoints."""

    CHAT = "chat"
    COMPLETION = "completion"


SAMPLING_PARAMETERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


class InvalidRequestError(ValueError):
    """The body cannot be served; the message says why (it never echoes prompt text)."""


class InvalidParameterError(InvalidRequestError):
    """A sampling parameter vLLM's validation refuses, named as vLLM names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """What the simulator needs from a completion request."""

    endpoint: Endpoint
    model: str
    prompt: Prompt
    stream: bool
    include_usage: bool
    max_tokens: int
    max_tokens_given: bool


def parse_completion_request(
    body: bytes, endpoint: Endpoint, default_max_tokens: int
) -> CompletionRequest:
    """Parse `body`, raising InvalidRequestError when it is not a usable request."""
    payload = _loads(body)
    if not isinstance(payload, dict):
        raise InvalidRequestError("the body must be a JSON object")
    _check_sampling(payload)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model is required")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream must be true or false")
    stream_options = payload.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    max_tokens = _max_tokens(payload, endpoint)
    try:
        if endpoint is Endpoint.CHAT:
            prompt = chat_prompt(model, payload.get("messages"))
        else:
            prompt = completion_prompt(model, payload.get("prompt"))
    except PromptError as error:
        raise InvalidRequestError(str(error)) from None
    return CompletionRequest(
        endpoint=endpoint,
        model=model,
        prompt=prompt,
        stream=stream,
        include_usage=stream and include_usage,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        max_tokens_given=max_tokens is not None,
    )


def _loads(body: bytes) -> Any:
    """The body as vLLM's server reads it (Python's `json`: `NaN` and `Infinity` are numbers)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequestError("the body is not valid JSON") from None


def _check_sampling(payload: dict[str, Any]) -> None:
    """A sampling parameter must be a finite number, as vLLM's validation insists."""
    for name in SAMPLING_PARAMETERS:
        value = payload.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidParameterError(
                f"{name} must be a finite number, got {value}. (parameter={name}, value={value})",
                name,
            )


def _max_tokens(payload: dict[str, Any], endpoint: Endpoint) -> int | None:
    names = (
        ("max_completion_tokens", "max_tokens") if endpoint is Endpoint.CHAT else ("max_tokens",)
    )
    for name in names:
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequestError(f"{name} must be a positive integer")
        return value
    return None
