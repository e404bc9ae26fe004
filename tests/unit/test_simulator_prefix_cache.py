"""The simulator's LRU prefix cache, sized in tokens."""

from __future__ import annotations

from gateway.simulator.prefix_cache import Block, PrefixCache


def chain(*keys: int, tokens: int = 10) -> tuple[Block, ...]:
    """A chain of blocks with the given keys, each `tokens` long."""
    return tuple(Block(key, tokens) for key in keys)


def test_first_sight_misses_and_second_sight_hits_every_block() -> None:
    """A chain is cached on first use; the same chain then hits in full."""
    cache = PrefixCache(1000)
    assert cache.match_and_insert(chain(1, 2, 3)) == 0
    assert cache.match_and_insert(chain(1, 2, 3)) == 30


def test_only_the_leading_run_of_cached_blocks_counts() -> None:
    """A hit stops at the first uncached block even if later blocks are cached."""
    cache = PrefixCache(1000)
    cache.match_and_insert(chain(1, 2, 3))
    assert cache.match_and_insert(chain(1, 9, 3)) == 10
    assert cache.match_and_insert(chain(7, 2, 3)) == 0


def test_capacity_evicts_least_recently_used_chains_first() -> None:
    """Past its token capacity the cache forgets the chain used longest ago."""
    cache = PrefixCache(40)
    cache.match_and_insert(chain(1, 2))
    cache.match_and_insert(chain(3, 4))
    cache.match_and_insert(chain(1, 2))
    cache.match_and_insert(chain(5, 6))
    assert cache.used_tokens == 40
    assert cache.match_and_insert(chain(1, 2)) == 20
    assert cache.match_and_insert(chain(3, 4)) == 0


def test_under_pressure_a_chain_loses_its_tail_before_its_head() -> None:
    """Eviction takes a chain's last blocks first, so its shared prefix stays useful."""
    cache = PrefixCache(30)
    cache.match_and_insert(chain(1, 2, 3))
    cache.match_and_insert(chain(8))
    assert cache.match_and_insert(chain(1, 2, 3)) == 20


def test_zero_capacity_caches_nothing() -> None:
    """A capacity of zero disables caching."""
    cache = PrefixCache(0)
    cache.match_and_insert(chain(1))
    assert cache.match_and_insert(chain(1)) == 0
    assert len(cache) == 0


def test_clear_forgets_everything() -> None:
    """After clear, every chain misses again."""
    cache = PrefixCache(100)
    cache.match_and_insert(chain(1))
    cache.clear()
    assert (cache.match_and_insert(chain(1)), cache.used_tokens) == (0, 10)
