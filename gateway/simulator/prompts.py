"""Prompts as chains of prefix-cache blocks, with the simulator's token-count approximation.

Token counts are approximate by design: text costs one token per four characters (rounded
up), each chat message costs four more for its role framing, and a prompt given as token ids
costs one token per id. A chat prompt is one block per message; a legacy prompt is one block
per sixteen tokens, vLLM's default block size. Each block's key hashes the block together with
the key before it (the first with the model), so one key stands for the whole prefix up to
and including its block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.simulator.prefix_cache import Block

CHARACTERS_PER_TOKEN = 4
MESSAGE_FRAMING_TOKENS = 4
BLOCK_TOKENS = 16


class PromptError(ValueError):
    """The prompt is not shaped as the endpoint expects; the message names the field only."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's prompts (a legacy request may batch several), each a chain of blocks."""

    chains: tuple[tuple[Block, ...], ...]
    tokens: int


def text_tokens(text: str) -> int:
    """The approximate token count of a piece of text."""
    return -(-len(text) // CHARACTERS_PER_TOKEN)


def chat_prompt(model: str, messages: Any) -> Prompt:
    """The prompt of a chat request: one chain, one block per message."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    key = hash(model)
    chain: list[Block] = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"messages[{position}] must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise PromptError(f"messages[{position}].role must be a string")
        text = _message_text(message, position)
        key = hash((key, role, text))
        chain.append(Block(key, _message_tokens(text)))
    return Prompt((tuple(chain),), sum(block.tokens for block in chain))


def reply_block(prompt: Prompt, text: str) -> Block:
    """The block an assistant message with `text` adds after a chat prompt's last message.

    vLLM keeps generated tokens in its prefix cache too, so the next turn of a conversation,
    which repeats this reply, finds it cached.
    """
    return Block(hash((prompt.chains[0][-1].key, "assistant", text)), _message_tokens(text))


def completion_prompt(model: str, prompt: Any) -> Prompt:
    """The prompt of a legacy completion: text, token ids, or a batch of either."""
    chains: tuple[tuple[Block, ...], ...]
    if isinstance(prompt, str):
        chains = (_text_chain(model, prompt),)
    elif _is_token_ids(prompt):
        chains = (_token_chain(model, prompt),)
    elif isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        chains = tuple(_text_chain(model, item) for item in prompt)
    elif isinstance(prompt, list) and prompt and all(_is_token_ids(item) for item in prompt):
        chains = tuple(_token_chain(model, item) for item in prompt)
    else:
        raise PromptError(
            "prompt must be a string, a list of strings, a list of token ids, or a list of those"
        )
    return Prompt(chains, sum(block.tokens for chain in chains for block in chain))


def _message_tokens(text: str) -> int:
    return MESSAGE_FRAMING_TOKENS + text_tokens(text)


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    )


def _text_chain(model: str, text: str) -> tuple[Block, ...]:
    step = BLOCK_TOKENS * CHARACTERS_PER_TOKEN
    key = hash(model)
    chain: list[Block] = []
    for start in range(0, len(text), step):
        piece = text[start : start + step]
        key = hash((key, piece))
        chain.append(Block(key, text_tokens(piece)))
    return tuple(chain)


def _token_chain(model: str, token_ids: Sequence[int]) -> tuple[Block, ...]:
    key = hash(model)
    chain: list[Block] = []
    for start in range(0, len(token_ids), BLOCK_TOKENS):
        piece = tuple(token_ids[start : start + BLOCK_TOKENS])
        key = hash((key, piece))
        chain.append(Block(key, len(piece)))
    return tuple(chain)


def _message_text(message: dict[str, Any], position: int) -> str:
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "".join(_part_text(part) for part in content)
    else:
        raise PromptError(f"messages[{position}].content must be a string or a list of parts")
    tool_calls = message.get("tool_calls")
    if tool_calls:
        text += orjson.dumps(tool_calls, option=orjson.OPT_SORT_KEYS).decode()
    return text


def _part_text(part: Any) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return str(part["text"])
    # Non-text parts (images, audio) still belong to the prefix; their JSON stands in for them.
    return orjson.dumps(part, option=orjson.OPT_SORT_KEYS).decode()
