"""Prompt chains and token approximation of the simulator."""

from __future__ import annotations

import pytest

from gateway.simulator.prompts import (
    BLOCK_TOKENS,
    MESSAGE_FRAMING_TOKENS,
    PromptError,
    chat_prompt,
    completion_prompt,
    reply_block,
    text_tokens,
)

SYSTEM = {"role": "system", "content": "You are terse."}


def test_text_costs_one_token_per_four_characters_rounded_up() -> None:
    """Token counts follow the documented len/4 approximation."""
    assert [text_tokens("a" * size) for size in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_chat_prompt_has_one_block_per_message_with_framing_tokens() -> None:
    """Each message is one block costing its text plus four framing tokens."""
    prompt = chat_prompt("m", [SYSTEM, {"role": "user", "content": "12345678"}])
    (chain,) = prompt.chains
    assert [block.tokens for block in chain] == [
        MESSAGE_FRAMING_TOKENS + text_tokens("You are terse."),
        MESSAGE_FRAMING_TOKENS + 2,
    ]
    assert prompt.tokens == sum(block.tokens for block in chain)


def test_block_keys_cover_the_whole_prefix() -> None:
    """Equal prefixes give equal keys; a different earlier message changes every later key."""
    user = {"role": "user", "content": "hi"}
    first = chat_prompt("m", [SYSTEM, user]).chains[0]
    same = chat_prompt("m", [SYSTEM, user, {"role": "user", "content": "more"}]).chains[0]
    other = chat_prompt("m", [{"role": "system", "content": "Be verbose."}, user]).chains[0]
    assert same[:2] == first
    assert other[1].key != first[1].key


def test_models_never_share_blocks() -> None:
    """The same messages sent to another model start a different chain."""
    (first,) = chat_prompt("a", [SYSTEM]).chains
    (second,) = chat_prompt("b", [SYSTEM]).chains
    assert first[0].key != second[0].key


def test_text_parts_count_like_plain_content() -> None:
    """Content given as text parts is the same prefix as the joined string."""
    parts = [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]
    assert chat_prompt("m", [{"role": "system", "content": parts}]) == chat_prompt("m", [SYSTEM])


def test_reply_block_matches_the_next_turns_assistant_message() -> None:
    """The block cached for a reply is the block the next turn's assistant message produces."""
    prompt = chat_prompt("m", [SYSTEM])
    next_turn = chat_prompt("m", [SYSTEM, {"role": "assistant", "content": "sim alpha"}])
    assert reply_block(prompt, "sim alpha") == next_turn.chains[0][1]


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [1], [{"content": "no role"}], [{"role": "user", "content": 3}]],
)
def test_malformed_messages_are_rejected(messages: object) -> None:
    """Messages that are not a non-empty list of role-carrying objects raise PromptError."""
    with pytest.raises(PromptError):
        chat_prompt("m", messages)


def test_text_prompt_is_split_into_sixteen_token_blocks() -> None:
    """A legacy text prompt becomes blocks of sixteen tokens, the last one partial."""
    prompt = completion_prompt("m", "x" * (BLOCK_TOKENS * 4 * 2 + 6))
    assert [block.tokens for block in prompt.chains[0]] == [16, 16, 2]
    assert prompt.tokens == 34


def test_token_id_and_batch_prompts_are_accepted() -> None:
    """Token ids count one token each; lists of strings or of id lists are batches."""
    assert completion_prompt("m", list(range(20))).tokens == 20
    assert len(completion_prompt("m", ["a", "b", "c"]).chains) == 3
    assert len(completion_prompt("m", [[1, 2], [3]]).chains) == 2


@pytest.mark.parametrize("prompt", [None, 3, [], ["a", 1], [True, False], {"text": "a"}])
def test_malformed_legacy_prompts_are_rejected(prompt: object) -> None:
    """Anything but text, token ids or a batch of one of those raises PromptError."""
    with pytest.raises(PromptError):
        completion_prompt("m", prompt)
