"""The allocator is trimmed once enough request memory was given back, at most once a refresh."""

from __future__ import annotations

from gateway.dispatch.allocator import FOLLOW_UPS, TRIM_AFTER_BYTES, TRIM_IDLE_BYTES, Trimmer
from gateway.dispatch.memory_budget import MemoryBudget

MIB = 1024 * 1024


def counting_trimmer() -> tuple[Trimmer, list[int]]:
    """A trimmer whose trim only notes its calls."""
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    return Trimmer(trim), calls


def test_a_trim_waits_for_enough_given_back_while_memory_is_held() -> None:
    """With bytes still held, small give-backs do not trim; 8 MiB given back does, once."""
    trimmer, calls = counting_trimmer()
    trimmer.given_back(TRIM_AFTER_BYTES - 1)
    assert not trimmer.settle(held=MIB)
    trimmer.given_back(1)
    assert trimmer.settle(held=MIB)
    assert not trimmer.settle(held=MIB)  # nothing given back since
    assert calls == [0]


def test_once_nothing_is_held_a_smaller_give_back_trims() -> None:
    """With nothing held (the traffic is over), 1 MiB given back is enough for a trim."""
    trimmer, calls = counting_trimmer()
    trimmer.given_back(TRIM_IDLE_BYTES - 1)
    assert not trimmer.settle(held=0)
    trimmer.given_back(1)
    assert trimmer.settle(held=0)
    assert calls == [0]


def test_without_malloc_trim_nothing_is_done() -> None:
    """Where the C library has no malloc_trim, settling is a no-op."""
    trimmer = Trimmer(None)
    trimmer.given_back(TRIM_AFTER_BYTES)
    assert not trimmer.settle(held=0)


def test_the_memory_budget_counts_what_requests_give_back() -> None:
    """Bytes a reservation releases are counted toward the next trim."""
    budget = MemoryBudget(64 * MIB, 0.5, wait_seconds=1.0)
    budget.trimmer, calls = counting_trimmer()
    reservation = budget.reservation("key")
    reservation.take_now("request_body", 2 * MIB)
    assert not budget.trimmer.settle(budget.held)
    reservation.release()
    assert budget.trimmer.settle(budget.held)
    assert calls == [0]


def test_a_trim_is_followed_by_a_few_more_while_nothing_is_held() -> None:
    """After a trim, the next FOLLOW_UPS refreshes with nothing held trim again, then stop."""
    trimmer, calls = counting_trimmer()
    trimmer.given_back(TRIM_AFTER_BYTES)
    assert trimmer.settle(held=MIB)
    assert not trimmer.settle(held=MIB)  # a request holds memory: no follow-up yet
    assert [trimmer.settle(held=0) for _ in range(FOLLOW_UPS + 2)] == [True] * FOLLOW_UPS + [
        False,
        False,
    ]
    assert len(calls) == 1 + FOLLOW_UPS
