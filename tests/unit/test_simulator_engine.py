"""The simulated engine: bounded sequences, a FIFO queue, hold, and the latency model."""

from __future__ import annotations

import asyncio

import pytest

from gateway.simulator.engine import Engine, Sequence
from gateway.simulator.options import Timing
from gateway.simulator.prefix_cache import PrefixCache
from gateway.simulator.prompts import chat_prompt
from tests.support.polling import wait_until

PROMPT = chat_prompt("m", [{"role": "user", "content": "x" * 400}])


def engine(max_num_seqs: int = 2, **timing: float) -> Engine:
    """An engine with instant timing unless overridden."""
    values = {"base_ttft_ms": 0.0, "per_token_ms": 0.0, "tokens_per_second": 0.0} | timing
    return Engine(Timing(max_num_seqs=max_num_seqs, **values), PrefixCache(10_000))


async def test_sequences_beyond_the_bound_wait_and_are_admitted_in_arrival_order() -> None:
    """With two slots the third and fourth sequences queue and start first come, first served."""
    subject = engine(max_num_seqs=2)
    running = [await subject.start(PROMPT, 1, 1.0) for _ in range(2)]
    admitted: list[int] = []

    async def start(number: int) -> Sequence:
        sequence = await subject.start(PROMPT, 1, 1.0)
        admitted.append(number)
        return sequence

    third = asyncio.create_task(start(3))
    await wait_until(lambda: subject.waiting == 1, message="third sequence queued")
    fourth = asyncio.create_task(start(4))
    await wait_until(lambda: subject.waiting == 2, message="fourth sequence queued")
    assert subject.running == 2

    running[0].finish("stop")
    (await third).finish("stop")
    running[1].finish("stop")
    (await fourth).finish("stop")

    assert admitted == [3, 4]
    assert (subject.running, subject.waiting, subject.peak_waiting) == (0, 0, 2)


async def test_a_cancelled_waiter_leaves_the_queue_without_taking_a_slot() -> None:
    """Cancelling a queued sequence removes it; the slot then goes to the next one."""
    subject = engine(max_num_seqs=1)
    first = await subject.start(PROMPT, 1, 1.0)
    cancelled = asyncio.create_task(subject.start(PROMPT, 1, 1.0))
    await wait_until(lambda: subject.waiting == 1, message="second sequence queued")
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert subject.waiting == 0
    first.finish("stop")
    assert subject.running == 0


async def test_hold_keeps_admitted_sequences_running_until_resumed() -> None:
    """While paused, admitted sequences occupy slots and wait; resume lets them through."""
    subject = engine(max_num_seqs=4)
    subject.pause()
    started = asyncio.create_task(subject.start(PROMPT, 1, 1.0))
    await wait_until(lambda: subject.running == 1, message="sequence admitted")
    assert not started.done()
    subject.resume()
    (await started).finish("stop")
    assert subject.finished_total == {"stop": 1}


async def test_ttft_charges_only_uncached_prompt_tokens_and_scales_with_slow() -> None:
    """TTFT is base + per-token cost of the uncached part, all times multiplied by slow."""
    subject = engine(base_ttft_ms=10.0, per_token_ms=1.0, tokens_per_second=50.0)
    cold = await subject.start(PROMPT, 4, 1.0)
    cold.finish("stop")
    warm = await subject.start(PROMPT, 4, 2.0)
    warm.finish("stop")
    assert cold.cached_tokens == 0
    assert cold.ttft_seconds == pytest.approx((10.0 + PROMPT.tokens) / 1000)
    assert warm.cached_tokens == PROMPT.tokens
    assert warm.ttft_seconds == pytest.approx(2 * 10.0 / 1000)
    assert warm.token_interval_seconds == pytest.approx(2 / 50.0)


async def test_prefix_cache_counters_are_in_tokens() -> None:
    """Queries count every prompt token, hits only the cached ones, like vLLM."""
    subject = engine()
    for _ in range(2):
        (await subject.start(PROMPT, 1, 1.0)).finish("stop")
    assert subject.prefix_cache_queries_total == 2 * PROMPT.tokens
    assert subject.prefix_cache_hits_total == PROMPT.tokens


async def test_finish_is_idempotent() -> None:
    """Finishing a sequence twice frees its slot once."""
    subject = engine(max_num_seqs=1)
    sequence = await subject.start(PROMPT, 1, 1.0)
    sequence.finish("stop")
    sequence.finish("stop")
    assert subject.running == 0
    assert subject.finished_total == {"stop": 1}


async def test_instant_timing_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero-latency fast path admits and produces every token without awaiting a sleep."""

    async def forbidden_sleep(delay: float) -> None:
        raise AssertionError(f"slept {delay} s on the zero-latency path")

    subject = engine()
    monkeypatch.setattr("gateway.simulator.engine.asyncio.sleep", forbidden_sleep)
    sequence = await subject.start(PROMPT, 16, 1.0)
    for index in range(16):
        await sequence.wait_for_token(index)
    sequence.finish("stop")
