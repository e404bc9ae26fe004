"""Responses API affinity: a stored response lives on the node that created it, so the store
remembers `response id → provider` and follow-ups from any worker go there.

A stored response belongs to the key that created it, for good: vLLM takes a client's
`request_id` as the new response's id, so a request choosing the id of another key's response is
refused before it reaches a node (it could overwrite that response there), and an answer whose
id is another key's is refused rather than recorded. Only responses the node stores (`store`
absent or true) are recorded, at most `affinity.responses_max_per_key` per key (a key's newest;
a new one evicts its oldest).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from aiohttp import web

from affinity_store.store import AffinityStore, StoreError
from gateway.catalog import Catalog, Key, Provider
from gateway.config_service import AffinitySettings
from gateway.dispatch.upstream import first_event
from gateway.edge.endpoints import RESPONSE_ID, ClientRequest, EndpointSpec
from gateway.shared.errors import GatewayError

logger = structlog.get_logger("gateway.edge.responses")


class ResponseBindings:
    """Records where stored responses live and finds their node again."""

    def __init__(self, store: AffinityStore, catalog: Catalog, settings: AffinitySettings) -> None:
        self._store = store
        self._catalog = catalog
        self._ttl = settings.responses_ttl_seconds
        self._max_per_key = settings.responses_max_per_key
        self._timeout = settings.claim_timeout_ms / 1000

    async def admit(self, key: Key, data: Mapping[str, Any]) -> bool:
        """Before a new response is made: whether the node will store it (a 400 for a `store`
        that is not a boolean), and a 409 when the id it chooses is another key's response."""
        stores = stored(data)
        chosen = data.get("request_id")
        if not isinstance(chosen, str) or not chosen:
            return stores
        try:
            taken = await self._store.response_taken(
                chosen, api_key_id=key.id, timeout=self._timeout
            )
        except StoreError:
            raise unavailable() from None
        if taken:
            raise id_taken(chosen, param="request_id")
        return stores

    async def record(
        self, key: Key, provider: Provider, opening: bytes | bytearray, stream: bool
    ) -> None:
        """Remember the node of the stored response whose answer opens with `opening` (a whole
        JSON body, or a stream's first event); a store failure is logged, never the client's. A
        409 instead of the answer when its id is another key's response."""
        response_id = response_id_in(opening, stream)
        if response_id is None:
            return
        try:
            written = await self._store.record_response(
                response_id,
                provider.name,
                api_key_id=key.id,
                ttl_seconds=self._ttl,
                max_per_key=self._max_per_key,
                timeout=self._timeout,
            )
        except StoreError as error:
            logger.warning(
                "response_binding_not_recorded", provider=provider.name, error=type(error).__name__
            )
            return
        if not written:
            logger.warning("response_id_conflict", provider=provider.name, key_id=key.id)
            raise id_taken(response_id, param=None)

    async def pinned(
        self, request: web.Request, spec: EndpointSpec, parsed: ClientRequest, key: Key
    ) -> Provider | None:
        """For a stored response's follow-up, the node that holds it (None for any other
        request, and for one that names no stored response)."""
        if spec.stickiness != "response":
            return None
        continued = response_id(request, parsed)
        return await self.provider_of(key, continued) if continued else None

    async def provider_of(self, key: Key, response_id: str) -> Provider:
        """The configured provider holding the key's response; a 404-style error when it is
        unknown (or another key's), expired, or its node is no longer configured (never a
        random node)."""
        try:
            name = await self._store.response_provider(
                response_id, api_key_id=key.id, timeout=self._timeout
            )
        except StoreError:
            raise unavailable() from None
        if name is None:
            raise GatewayError(
                404,
                f"No response with id `{response_id[:200]}` is known (it expired or never "
                "existed).",
                "response_not_found",
                param="previous_response_id",
            )
        provider = self._catalog.providers.get(name)
        if provider is None:
            raise node_gone(response_id)
        return provider


def response_id(request: web.Request, parsed: ClientRequest) -> str:
    """The stored response a request continues: its path's id, or `previous_response_id`."""
    return request.match_info.get(RESPONSE_ID) or parsed.previous_response_id or ""


def stored(data: Mapping[str, Any]) -> bool:
    """Whether a new response is to be stored on its node: `store` absent or true (vLLM stores
    none for false or null); a 400 for any other value."""
    store = data.get("store", True)
    if store is not None and not isinstance(store, bool):
        raise GatewayError(400, "`store` must be a boolean.", "invalid_type", param="store")
    return store is True


def id_taken(response_id: str, *, param: str | None) -> GatewayError:
    """The refusal of a response id that is another key's response."""
    return GatewayError(
        409,
        f"The response id `{response_id[:200]}` is already in use; choose another "
        "(or send no `request_id`).",
        "response_id_in_use",
        param=param,
    )


def unavailable() -> GatewayError:
    """The error when the store cannot say who holds a response."""
    return GatewayError(
        503,
        "The gateway cannot look up which node holds this response right now.",
        "store_unavailable",
        retry_after=1,
    )


def node_gone(response_id: str) -> GatewayError:
    """The error for a response whose node is no longer there."""
    return GatewayError(
        404,
        f"The response `{response_id[:200]}` was stored on a node that is no longer available; "
        "it cannot be continued. Start a new response.",
        "response_node_gone",
        param="previous_response_id",
    )


def response_id_in(opening: bytes | bytearray, stream: bool) -> str | None:
    """The `id` of a Responses answer: the body's, or for a stream its first event's response."""
    data: bytes | bytearray
    if stream:
        event = first_event(bytes(opening))
        if event is None:
            return None
        data = b"\n".join(
            line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
        )
    else:
        data = opening
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    if stream and isinstance(document.get("response"), dict):
        document = document["response"]
    response_id = document.get("id")
    return response_id if isinstance(response_id, str) and response_id else None
