"""The proxied endpoints, as one table, and how each one's request body is read for routing.

Adding an endpoint is a row: its method and path, how its body is handled, and what it sticks
to (`model`: the model's configured stickiness; `none`: the least-loaded provider;
`response`: the node holding a stored response).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.edge.payload import Endpoint, parse_payload
from gateway.shared.errors import GatewayError

BodyKind = Literal["json", "multipart", "none"]
StickinessKind = Literal["model", "none", "response"]
RESPONSE_ID = "response_id"


@dataclass(frozen=True)
class EndpointSpec:
    """One proxied endpoint; `fields` names what a JSON body must hold besides `model`;
    `model_optional`: a body may leave `model` out (vLLM then uses its default model; the
    gateway, the key's default model: see `Catalog.default_model`)."""

    method: str
    path: str
    body: BodyKind
    stickiness: StickinessKind
    fields: Endpoint = "model"
    stores_responses: bool = False
    model_optional: bool = False


ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("POST", "/v1/chat/completions", "json", "model", "chat"),
    EndpointSpec("POST", "/v1/completions", "json", "model", "completions"),
    EndpointSpec("POST", "/v1/embeddings", "json", "none"),
    EndpointSpec("POST", "/v1/rerank", "json", "none"),
    EndpointSpec("POST", "/v1/score", "json", "none"),
    EndpointSpec("POST", "/tokenize", "json", "none", model_optional=True),
    EndpointSpec("POST", "/detokenize", "json", "none", model_optional=True),
    EndpointSpec("POST", "/v1/audio/transcriptions", "multipart", "none"),
    EndpointSpec("POST", "/v1/responses", "json", "response", stores_responses=True),
    EndpointSpec("GET", f"/v1/responses/{{{RESPONSE_ID}}}", "none", "response"),
    EndpointSpec("DELETE", f"/v1/responses/{{{RESPONSE_ID}}}", "none", "response"),
)


@dataclass(frozen=True)
class ClientRequest:
    """What routing needs from a request body, and the body to send for an upstream model id."""

    model: str | None
    stream: bool
    data: dict[str, Any]
    previous_response_id: str | None
    body_for: Callable[[str], bytes | None]
    # (head_bytes, the conversation's stable head) when computed where the body was parsed;
    # None: computed from `data` when needed.
    known_head: tuple[int, bytes | None] | None = None


def parse_request(spec: EndpointSpec, raw: bytes) -> ClientRequest:
    """Read a JSON (or absent) request body as its endpoint expects; a clear 400 when wrong."""
    if spec.body == "none":
        return ClientRequest(None, False, {}, None, lambda upstream_model: None)
    if spec.body == "multipart":
        raise ValueError("multipart bodies are streamed through: see gateway.edge.uploads")
    payload = parse_payload(raw, spec.fields, model_optional=spec.model_optional)
    previous = payload.data.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise GatewayError(
            400,
            "`previous_response_id` must be a non-empty string.",
            "invalid_type",
            param="previous_response_id",
        )
    return ClientRequest(
        payload.model, payload.stream, payload.data, previous, payload.for_upstream
    )
