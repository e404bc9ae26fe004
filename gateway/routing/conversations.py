"""The conversation a request belongs to, for shared bindings finer than one per key.

An application that serves many people through one key would pin all of them to one node with
a binding per `(key, model)`; their working set then outgrows that node's cache. A binding per
`(key, model, conversation)` spreads them while keeping each conversation on the node that holds
its context. The conversation is named, most explicit first, by:

1. the request's `prompt_cache_key` (OpenAI's field for exactly this);
2. a session header (`SESSION_HEADERS`);
3. with scope `conversation` only: a digest of the conversation's stable head, the part every
   turn repeats: the messages up to and including the first user message (chat, and Responses
   `input` lists), or the first `head_bytes` bytes of the prompt (completions, Responses `input`
   text).

Every value is an HMAC-SHA256 under a key derived from the deployment's `conversation_secret`
and the client key's digest, so what the store holds says nothing about the prompt or the
client's ids, and the same head under another deployment gives another value. It is never
logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, Literal

import orjson

from gateway.routing.sessions import SESSION_HEADERS

Scope = Literal["key", "conversation"]

SEPARATOR = "#"
"""Joins a model and a conversation in the binding's model column; no model name contains it."""

DIGEST_HEX_CHARACTERS = 32
"""128 bits of the HMAC: collisions among a key's conversations are out of reach."""

MAX_EXPLICIT_LENGTH = 256
"""A longer `prompt_cache_key` or header value is cut here before it is hashed."""


def binding_secret(deployment_secret: bytes, key_digest: str) -> bytes:
    """The HMAC key for one client key's conversations."""
    return hashlib.sha256(deployment_secret + b"\0" + key_digest.encode("ascii")).digest()


def conversation_of(
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    *,
    scope: Scope,
    deployment_secret: bytes,
    key_digest: str,
    head_bytes: int,
    known_head: tuple[int, bytes | None] | None = None,
) -> str | None:
    """The request's conversation value, or None when it has none (the key's binding then).
    `known_head`: the stable head already taken (with the `head_bytes` it was taken at)."""
    explicit = _explicit(body, headers)
    if explicit is not None:
        message = b"explicit\0" + explicit.encode("utf-8", "surrogatepass")
    elif scope == "conversation" and (head := _head(body, head_bytes, known_head)) is not None:
        message = b"head\0" + head
    else:
        return None
    secret = binding_secret(deployment_secret, key_digest)
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:DIGEST_HEX_CHARACTERS]


def _head(
    body: Mapping[str, Any], head_bytes: int, known: tuple[int, bytes | None] | None
) -> bytes | None:
    """The stable head: the one already taken at this length, else taken from the body."""
    if known is not None and known[0] == head_bytes:
        return known[1]
    return stable_head(body, head_bytes)


def binding_model(model: str, conversation: str | None) -> str:
    """What the store binds: the model, or the model and the conversation."""
    return model if conversation is None else f"{model}{SEPARATOR}{conversation}"


def stable_head(body: Mapping[str, Any], head_bytes: int) -> bytes | None:
    """The bytes every turn of the conversation repeats; None when the body has none."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return _messages_head(messages)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list):
        if prompt and all(isinstance(item, Mapping) for item in prompt):
            return _messages_head(prompt)  # Responses `input` as a list of messages
        prompt = prompt[0] if prompt and not isinstance(prompt[0], int) else prompt
    if isinstance(prompt, str):
        return prompt.encode("utf-8", "surrogatepass")[:head_bytes] or None
    if isinstance(prompt, list):  # token ids
        return orjson.dumps(prompt[:head_bytes]) if prompt else None
    return None


def _messages_head(messages: list[Any]) -> bytes | None:
    """The messages up to and including the first user message, serialised canonically."""
    for index, message in enumerate(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            head = messages[: index + 1]
            break
    else:
        head = messages
    if not head:
        return None
    try:
        return orjson.dumps(head, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # not JSON-shaped after all (orjson refuses); no head to speak of
        return None


def _explicit(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The client's own name for the conversation: `prompt_cache_key`, else a session header."""
    value = body.get("prompt_cache_key")
    if isinstance(value, str) and value.strip():
        return value.strip()[:MAX_EXPLICIT_LENGTH]
    for name in SESSION_HEADERS:
        found = headers.get(name)
        if found is not None and found.strip():
            return found.strip()[:MAX_EXPLICIT_LENGTH]
    return None
