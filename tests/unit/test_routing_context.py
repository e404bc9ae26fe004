"""What a request is routed by: only sticky endpoints of sticky models read a conversation."""

from __future__ import annotations

from typing import Any

from gateway.catalog import Catalog
from gateway.edge.endpoints import ENDPOINTS, EndpointSpec
from gateway.edge.routing_context import routing_context
from gateway.selection.router import RequestContext
from tests.support.gateway import TEST_MODEL, build_settings

CHAT = {
    "model": TEST_MODEL,
    "messages": [{"role": "user", "content": "hello"}],
    "input": "embed me",
    "prompt": "complete me",
}
HEADERS = {"x-session-id": "s-1"}


def spec(path: str) -> EndpointSpec:
    """The proxied endpoint at `path`."""
    return next(endpoint for endpoint in ENDPOINTS if endpoint.path == path)


def context(
    path: str, *, scope: str = "conversation", pinned: bool = False, **model: Any
) -> RequestContext:
    """The routing context of one request to `path` for the test model."""
    extra: dict[str, Any] = {"affinity": {"scope": scope, "conversation_secret": "s" * 32}}
    if model:
        extra["models"] = [{"name": TEST_MODEL, **model}]
    settings = build_settings({"node-a": "http://127.0.0.1:9001"}, extra=extra)
    catalog = Catalog(settings)
    return routing_context(
        catalog,
        spec(path),
        request_id="r-1",
        key=catalog.keys["team-a"],
        model=TEST_MODEL,
        stream=False,
        headers=HEADERS,
        body=CHAT,
        pinned=pinned,
    )


def test_chat_and_completions_of_a_shared_model_carry_the_conversation() -> None:
    """The sticky endpoints compute the conversation's digest under scope conversation."""
    assert context("/v1/chat/completions").conversation is not None
    assert context("/v1/completions").conversation is not None


def test_endpoints_without_stickiness_never_compute_a_conversation() -> None:
    """Embeddings, tokenize and the other least-loaded endpoints skip the digest entirely."""
    for endpoint in ENDPOINTS:
        if endpoint.stickiness == "none":
            routed = context(endpoint.path)
            assert (routed.conversation, routed.session_id) == (None, None), endpoint.path


def test_a_request_pinned_to_a_stored_response_computes_no_conversation() -> None:
    """A request that names a stored response goes to its node: no digest is made."""
    assert context("/v1/chat/completions", pinned=True).conversation is None


def test_a_session_model_reads_the_session_only_on_sticky_endpoints() -> None:
    """stickiness session: chat reads the session header, embeddings do not."""
    assert context("/v1/chat/completions", stickiness="session").session_id == "s-1"
    assert context("/v1/embeddings", stickiness="session").session_id is None
