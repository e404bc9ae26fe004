"""The proxied endpoints, as one table, and how each one's request body is read for routing.

Adding an endpoint is a row: its method and path, how its body is handled, and what it sticks
to (`model`: the model's configured stickiness; `none`: the least-loaded provider;
`response`: the node holding a stored response).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import GatewayError
from gateway.payload import Endpoint, parse_payload

BodyKind = Literal["json", "multipart", "none"]
StickinessKind = Literal["model", "none", "response"]
RESPONSE_ID = "response_id"


@dataclass(frozen=True)
class EndpointSpec:
    """One proxied endpoint; `fields` names what a JSON body must hold besides `model`."""

    method: str
    path: str
    body: BodyKind
    stickiness: StickinessKind
    fields: Endpoint = "model"
    stores_responses: bool = False


ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("POST", "/v1/chat/completions", "json", "model", "chat"),
    EndpointSpec("POST", "/v1/completions", "json", "model", "completions"),
    EndpointSpec("POST", "/v1/embeddings", "json", "none"),
    EndpointSpec("POST", "/v1/rerank", "json", "none"),
    EndpointSpec("POST", "/v1/score", "json", "none"),
    EndpointSpec("POST", "/tokenize", "json", "none"),
    EndpointSpec("POST", "/detokenize", "json", "none"),
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


def parse_request(spec: EndpointSpec, raw: bytes, content_type: str) -> ClientRequest:
    """Read a request body as its endpoint expects; 400 with a clear message when it is wrong."""
    if spec.body == "none":
        return ClientRequest(None, False, {}, None, lambda upstream_model: None)
    if spec.body == "multipart":
        return _multipart(raw, content_type)
    payload = parse_payload(raw, spec.fields)
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


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_FIELD_NAME = re.compile(rb'content-disposition:[^\r\n]*;\s*name="([^"]*)"', re.IGNORECASE)


def _multipart(raw: bytes, content_type: str) -> ClientRequest:
    """A multipart form: its `model` field (spliced in place for an upstream id) and `stream`."""
    boundary = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/form-data") or boundary is None:
        raise GatewayError(
            400, "This endpoint takes a multipart/form-data body.", "invalid_request"
        )
    fields = _form_fields(raw, b"--" + boundary.group(1).encode("latin-1"))
    if "model" not in fields:
        raise GatewayError(
            400, "You must provide a model parameter.", "missing_field", param="model"
        )
    start, end = fields["model"]
    model = raw[start:end].decode("utf-8", errors="replace").strip()
    if not model:
        raise GatewayError(
            400, "`model` must be a non-empty string.", "invalid_type", param="model"
        )
    stream = "stream" in fields and raw[slice(*fields["stream"])].strip().lower() == b"true"
    body_for = functools.partial(_splice_field, raw, model, start, end)
    return ClientRequest(model, stream, {}, None, body_for)


def _form_fields(raw: bytes, delimiter: bytes) -> dict[str, tuple[int, int]]:
    """Where each named part's value lies in the body (a file part's too; the last one wins)."""
    fields: dict[str, tuple[int, int]] = {}
    position = raw.find(delimiter)
    while position >= 0:
        start = position + len(delimiter)
        following = raw.find(delimiter, start)
        if following < 0:
            break
        head_end = raw.find(b"\r\n\r\n", start, following)
        name = _FIELD_NAME.search(raw, start, head_end) if head_end >= 0 else None
        if name is not None:
            value_end = following - 2 if raw[following - 2 : following] == b"\r\n" else following
            fields[name.group(1).decode("utf-8", errors="replace")] = (head_end + 4, value_end)
        position = following
    return fields


def _splice_field(raw: bytes, model: str, start: int, end: int, upstream_model: str) -> bytes:
    """The form with its model field's value replaced by `upstream_model` (when it differs)."""
    if upstream_model == model:
        return raw
    return raw[:start] + upstream_model.encode() + raw[end:]
