"""Turn a request's prompt into chained cache blocks and a token count.

Token counts are an approximation: a piece of text counts ceil(characters / 4) tokens (at
least one per chat message), and a prompt given as token ids counts one token per id.
Chat prompts form one block per message; text prompts one block per 64 characters (16
tokens, vLLM's block size); token-id prompts one block per 16 ids. Each block's key hashes
the previous block's key with the block's content, starting from the model name, so a key
stands for the whole prefix up to and including its block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.simulator.prefix_cache import Block

TEXT_BLOCK_CHARACTERS = 64
TOKEN_BLOCK_SIZE = 16


class PromptError(ValueError):
    """The request's prompt is missing or has the wrong shape."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's prompt: one block chain per prompt (legacy completions may send several)."""

    chains: tuple[tuple[Block, ...], ...]
    tokens: int


def estimate_tokens(text: str) -> int:
    """Approximate a text's token count as ceil(characters / 4)."""
    return (len(text) + 3) // 4


def chat_prompt(model: str, messages: Any) -> Prompt:
    """Build the prompt of a chat request: one block per message."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    key = hash(model)
    blocks: list[Block] = []
    total = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise PromptError("each message must be an object with a string role")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            text = orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()
        tokens = max(1, estimate_tokens(text))
        key = hash((key, message["role"], text))
        blocks.append(Block(key, tokens))
        total += tokens
    return Prompt((tuple(blocks),), total)


def completion_prompt(model: str, prompt: Any) -> Prompt:
    """Build the prompt of a legacy completion: a string, a list of strings, or token ids."""
    if isinstance(prompt, str):
        pieces: Sequence[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(item) for item in prompt):
        pieces = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_piece(item) for item in prompt):
        pieces = prompt
    else:
        raise PromptError("prompt must be a string, a list of strings or a list of token ids")
    chains = tuple(_text_chain(model, piece) if isinstance(piece, str) else _token_chain(model, piece) for piece in pieces)
    return Prompt(chains, sum(block.tokens for chain in chains for block in chain))


def _is_token(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _is_piece(item: Any) -> bool:
    return isinstance(item, str) or (isinstance(item, list) and all(_is_token(token) for token in item))


def _text_chain(model: str, text: str) -> tuple[Block, ...]:
    key = hash(model)
    blocks: list[Block] = []
    for start in range(0, len(text), TEXT_BLOCK_CHARACTERS):
        piece = text[start : start + TEXT_BLOCK_CHARACTERS]
        key = hash((key, piece))
        blocks.append(Block(key, estimate_tokens(piece)))
    return tuple(blocks)


def _token_chain(model: str, token_ids: list[int]) -> tuple[Block, ...]:
    key = hash(model)
    blocks: list[Block] = []
    for start in range(0, len(token_ids), TOKEN_BLOCK_SIZE):
        piece = tuple(token_ids[start : start + TOKEN_BLOCK_SIZE])
        key = hash((key, piece))
        blocks.append(Block(key, len(piece)))
    return tuple(blocks)
