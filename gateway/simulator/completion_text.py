"""Deterministic fake completion text: the node's name, then words chosen by the request number."""

from __future__ import annotations

VOCABULARY = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliett",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
)


def completion_tokens(node_name: str, request_number: int, count: int) -> list[str]:
    """Return `count` token texts; joined they read "<node name> <word> <word> ..."."""
    if count <= 0:
        return []
    tokens = [node_name]
    size = len(VOCABULARY)
    tokens.extend(" " + VOCABULARY[(request_number + index) % size] for index in range(1, count))
    return tokens
