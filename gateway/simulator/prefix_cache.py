"""A per-node LRU prefix cache over chained prompt blocks, sized in tokens like a KV cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Block:
    """One prompt block: a key that covers it and every block before it, and its token count."""

    key: int
    tokens: int


class PrefixCache:
    """Remembers block keys up to a token capacity, evicting the least recently used first."""

    def __init__(self, capacity_tokens: int) -> None:
        """Start empty; a capacity of zero disables caching."""
        self.capacity_tokens = capacity_tokens
        self.used_tokens = 0
        self._entries: OrderedDict[int, int] = OrderedDict()

    def match_and_insert(self, chain: Sequence[Block]) -> int:
        """Return the tokens of the longest cached leading run of `chain`, then cache the chain."""
        entries = self._entries
        cached_tokens = 0
        matched = 0
        for block in chain:
            if block.key not in entries:
                break
            cached_tokens += block.tokens
            matched += 1
        stored = matched
        for block in chain[matched:]:
            if block.tokens > self.capacity_tokens:
                break
            previous = entries.get(block.key)
            if previous is not None:
                self.used_tokens -= previous
            entries[block.key] = block.tokens
            self.used_tokens += block.tokens
            stored += 1
        # Touch from the tail back to the head so a chain's first blocks are the most recently
        # used: under pressure a chain loses its tail, never the prefix everything else needs.
        for index in range(stored - 1, -1, -1):
            entries.move_to_end(chain[index].key)
        while self.used_tokens > self.capacity_tokens:
            _, tokens = entries.popitem(last=False)
            self.used_tokens -= tokens
        return cached_tokens

    def clear(self) -> None:
        """Forget every block."""
        self._entries.clear()
        self.used_tokens = 0

    def __len__(self) -> int:
        """The number of cached blocks."""
        return len(self._entries)
