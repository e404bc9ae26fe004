"""A request's conversation: explicit names first, then a keyed digest of the stable head."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.routing.conversations import (
    DIGEST_HEX_CHARACTERS,
    binding_model,
    conversation_of,
    stable_head,
)

SYSTEM = {"role": "system", "content": "You are the shop's helpful assistant. " * 50}
DIGEST = "a" * 64


def turns(first_question: str, count: int) -> list[dict[str, Any]]:
    """A chat body's messages after `count` user turns of one conversation."""
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": first_question}]
    for turn in range(1, count):
        messages.append({"role": "assistant", "content": f"answer {turn}"})
        messages.append({"role": "user", "content": f"follow-up {turn}"})
    return messages


def identity(
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    *,
    scope: str = "conversation",
    secret: bytes = b"deployment-1",
    key_digest: str = DIGEST,
) -> str | None:
    """The conversation value under the given scope and secrets."""
    return conversation_of(
        body,
        headers or {},
        scope=scope,  # type: ignore[arg-type]
        deployment_secret=secret,
        key_digest=key_digest,
        head_bytes=4096,
    )


def test_prompt_cache_key_wins_over_the_header_and_the_header_over_the_digest() -> None:
    """prompt_cache_key > session header > digest of the head."""
    body: dict[str, Any] = {"messages": turns("hello", 1)}
    by_head = identity(body)
    by_header = identity(body, {"x-session-id": "s-1"})
    by_field = identity({**body, "prompt_cache_key": "user-42"}, {"x-session-id": "s-1"})
    assert len({by_head, by_header, by_field}) == 3
    assert by_field == identity({"messages": turns("other", 3), "prompt_cache_key": "user-42"})
    assert by_header == identity({"messages": turns("other", 2)}, {"x-session-id": "s-1"})


def test_every_turn_of_a_conversation_has_the_same_digest() -> None:
    """The head (messages up to the first user message) is what every turn repeats."""
    values = {identity({"messages": turns("Where is my parcel?", count)}) for count in range(1, 7)}
    assert len(values) == 1
    (value,) = values
    assert value is not None
    assert len(value) == DIGEST_HEX_CHARACTERS


def test_conversations_with_a_shared_system_prompt_differ_by_their_first_question() -> None:
    """24 users of one app, one system prompt, different first questions: 24 values."""
    values = {identity({"messages": turns(f"question of user {user}", 3)}) for user in range(24)}
    assert len(values) == 24


def test_the_digest_is_keyed_by_the_deployment_and_the_client_key() -> None:
    """The same head under another deployment's secret, or another key, gives another value."""
    body: dict[str, Any] = {"messages": turns("hello", 2)}
    assert identity(body) != identity(body, secret=b"deployment-2")
    assert identity(body) != identity(body, key_digest="b" * 64)
    assert identity(body) == identity(body)


def test_values_reveal_nothing_of_the_prompt_or_the_clients_ids() -> None:
    """What the store holds is a fixed-length hex digest, whatever the client sent."""
    for body, headers in (
        ({"messages": turns("my secret question", 1)}, {}),
        ({"prompt_cache_key": "alice@example.com"}, {}),
        ({}, {"x-session-id": "alice@example.com"}),
    ):
        value = identity(body, headers)
        assert value is not None
        assert len(value) == DIGEST_HEX_CHARACTERS
        assert set(value) <= set("0123456789abcdef")
        assert "alice" not in value
        assert "secret" not in value


def test_scope_key_uses_only_explicit_names() -> None:
    """With scope `key`, a request without prompt_cache_key or header stays on the key binding."""
    body: dict[str, Any] = {"messages": turns("hello", 1)}
    assert identity(body, scope="key") is None
    assert identity(body, {"x-session-id": "s-1"}, scope="key") == identity(
        body, {"x-session-id": "s-1"}
    )
    assert identity({**body, "prompt_cache_key": " "}, scope="key") is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompt": "x" * 5000}, b"x" * 4096),
        ({"prompt": ["first prompt", "second"]}, b"first prompt"),
        ({"prompt": [1, 2, 3]}, b"[1,2,3]"),
        ({"input": "Tell me a story"}, b"Tell me a story"),
        (
            {"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            b'[{"content":"hi","role":"user"}]',
        ),
        ({"prompt": ""}, None),
        ({"messages": []}, None),
        ({"model": "m"}, None),
    ],
)
def test_the_stable_head_of_each_request_shape(
    body: dict[str, Any], expected: bytes | None
) -> None:
    """Completions: the prompt's first bytes; Responses: its input; nothing: no head."""
    assert stable_head(body, 4096) == expected


def test_a_head_is_canonical_whatever_the_key_order_of_its_messages() -> None:
    """Two clients that order a message's fields differently still share the head."""
    one = {"messages": [{"role": "user", "content": "hi"}]}
    other = {"messages": [{"content": "hi", "role": "user"}]}
    assert identity(one) == identity(other)


def test_a_binding_names_the_model_and_its_conversation() -> None:
    """The key binding is the model alone; a conversation's is model#digest."""
    assert binding_model("llama", None) == "llama"
    assert binding_model("llama", "0f" * 16) == "llama#" + "0f" * 16
