"""What the edge asks the router, and the failover list it takes back.

A request's routing context carries its session id or its conversation's digest only when a
sticky endpoint (chat, completions) of a sticky model needs it. The failover list is the stored
response's node alone for a follow-up, the least-loaded providers for endpoints without
stickiness, and otherwise the router's decision for the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.catalog import Catalog, Key, Provider
from gateway.edge.endpoints import EndpointSpec
from gateway.routing.conversations import conversation_of
from gateway.routing.sessions import session_id_from
from gateway.selection.router import RequestContext, Router, RoutingDecision


def routing_context(
    catalog: Catalog,
    spec: EndpointSpec,
    *,
    request_id: str,
    key: Key,
    model: str | None,
    stream: bool,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    pinned: bool,
    known_head: tuple[int, bytes | None] | None = None,
) -> RequestContext:
    """What the router routes a request by. Only a sticky endpoint (chat, completions) of a
    sticky model reads a session id or computes the conversation's digest: embeddings,
    tokenize and the other least-loaded endpoints, and requests pinned to a stored response,
    never do the work. `known_head`: the conversation's stable head, when the body's parse
    already took it (a costly body parsed in the helper process)."""
    sticky = model is not None and spec.stickiness != "none" and not pinned
    stickiness = catalog.stickiness(model) if sticky and model is not None else "none"
    conversation = None
    if stickiness == "shared" and model is not None:
        conversation = conversation_of(
            body,
            headers,
            scope=catalog.affinity_scope(model),
            deployment_secret=catalog.conversation_secret,
            key_digest=key.digest,
            head_bytes=catalog.conversation_head_bytes,
            known_head=known_head,
        )
    return RequestContext(
        request_id=request_id,
        key=key,
        model=model or "",
        stream=stream,
        session_id=session_id_from(headers, body) if stickiness == "session" else None,
        conversation=conversation,
    )


async def decide(
    router: Router,
    spec: EndpointSpec,
    context: RequestContext,
    candidates: tuple[Provider, ...],
    pinned: Provider | None,
) -> RoutingDecision:
    """The failover list: the stored response's node alone; the least-loaded providers for
    endpoints without stickiness (cooling last, then by load, then the least recently
    started first); else the router's decision for the model."""
    if pinned is not None:
        return RoutingDecision(failover=[pinned], reasons=["stored-response"], affinity="hit")
    if spec.stickiness == "none":
        ordered = sorted(
            candidates,
            key=lambda provider: (
                router.health.cooling(provider.name),
                router.load(provider.name),
                router.starts.last_started(provider.routing_identity) or 0.0,
            ),
        )
        return RoutingDecision(
            failover=ordered, reasons=["least-loaded"] * len(ordered), affinity="none"
        )
    return await router.decide(context, candidates)
