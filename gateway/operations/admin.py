"""`/admin/*`: operator endpoints behind the admin token; absent when no token is configured."""

from __future__ import annotations

import base64
import hmac

from aiohttp import web

from affinity_store.store import AffinityStore, StoreError
from gateway.shared.errors import GatewayError, is_utf8

ADMIN_TIMEOUT_SECONDS = 2.0
MAX_LISTED = 10_000


def check_admin(request: web.Request, token: str) -> None:
    """Raise 401 unless the request carries the admin token.

    `Authorization: Bearer <token>` for tools; HTTP Basic with the token as password (any
    user name) so a browser can open the status page.
    """
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    offered = credentials.strip()
    if scheme.lower() == "basic":
        try:
            offered = base64.b64decode(offered, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            offered = ""
    elif scheme.lower() != "bearer":
        offered = ""
    valid = bool(offered) and is_utf8(offered)
    if not valid or not hmac.compare_digest(offered.encode(), token.encode()):
        raise GatewayError(
            401,
            "This endpoint needs the admin token.",
            "invalid_admin_token",
            headers={"WWW-Authenticate": 'Basic realm="affinity-gateway admin"'},
        )


async def bindings(request: web.Request, store: AffinityStore) -> web.Response:
    """Live bindings as JSON, filtered by `key` and `model`; no key material, only ids."""
    try:
        limit = min(int(request.query.get("limit", "1000")), MAX_LISTED)
    except ValueError:
        raise GatewayError(
            400, "`limit` must be an integer.", "invalid_type", param="limit"
        ) from None
    try:
        rows = await store.list_bindings(
            api_key_id=request.query.get("key"),
            model=request.query.get("model"),
            limit=max(limit, 0),
            timeout=ADMIN_TIMEOUT_SECONDS,
        )
    except StoreError:
        raise GatewayError(
            503, "The affinity store is unavailable.", "store_unavailable", retry_after=1
        ) from None
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "key_id": row.api_key_id,
                    "model": row.model,
                    "provider": row.provider,
                    "routing_identity": row.routing_identity,
                    "expires_at": row.expires_at.isoformat(),
                    "ttl_remaining_seconds": round(row.ttl_remaining, 1),
                }
                for row in rows
            ],
        }
    )
