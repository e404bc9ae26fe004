"""Authentication: a request's key, from its `Authorization: Bearer` header or else its `api-key`
/ `x-api-key` header, looked up in the catalog; 401 when none is sent or the catalog knows none."""

from __future__ import annotations

from aiohttp import web

from gateway.catalog import Catalog, Key
from gateway.shared.errors import GatewayError, is_utf8

# Client headers that carry the key, in the order they are looked at.
KEY_HEADERS = ("api-key", "x-api-key")


def authenticate(catalog: Catalog, request: web.BaseRequest) -> Key:
    """The key of a `Bearer` Authorization header (or an `api-key` / `x-api-key` header),
    or a 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if not token:
        token = next(
            (value.strip() for name in KEY_HEADERS if (value := request.headers.get(name))),
            "",
        )
    if not token:
        raise GatewayError(
            401,
            "Missing API key: send `Authorization: Bearer <key>` (or an `api-key` header).",
            "missing_api_key",
        )
    key = catalog.authenticate(token) if is_utf8(token) else None
    if key is None:
        raise GatewayError(401, "Invalid API key.", "invalid_api_key")
    return key
