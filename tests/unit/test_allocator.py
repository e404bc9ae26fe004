"""The allocator is trimmed once enough request memory was given back, at most once a refresh."""

from __future__ import annotations

from gateway.dispatch.allocator import TRIM_AFTER_BYTES, TRIM_IDLE_BYTES, Trimmer, resident_bytes
from gateway.dispatch.memory_budget import MemoryBudget

MIB = 1024 * 1024


def counting_trimmer(resident: list[int] | None = None) -> tuple[Trimmer, list[int]]:
    """A trimmer whose trim only notes its calls; the resident size is `resident[0]` (fixed at
    100 MiB when not given)."""
    calls: list[int] = []
    size = resident if resident is not None else [100 * MIB]

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    return Trimmer(trim, lambda: size[0]), calls


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


def test_growth_after_the_traffic_is_trimmed_whenever_it_comes() -> None:
    """With nothing held, a resident size 1 MiB past what the last trim left trims, however
    late the memory was freed; growth that stays costs one trim, not one per refresh."""
    resident = [100 * MIB]
    trimmer, calls = counting_trimmer(resident)
    assert not trimmer.settle(held=0)  # the first refresh takes the mark
    resident[0] += TRIM_IDLE_BYTES - 1
    assert not trimmer.settle(held=0)
    resident[0] += 1
    assert not trimmer.settle(held=MIB)  # a request holds memory: not now
    assert trimmer.settle(held=0)
    # The trim could return nothing (the memory is in use): the mark moves up with it.
    assert [trimmer.settle(held=0) for _ in range(5)] == [False] * 5
    resident[0] += 8 * MIB  # freed late, by a request that outlived its client
    assert trimmer.settle(held=0)
    assert len(calls) == 2


def test_the_resident_size_is_read_from_the_process() -> None:
    """This process's resident size: more than its own interpreter, less than the machine."""
    size = resident_bytes()
    assert size is not None
    assert 10 * MIB < size < 64 * 1024 * MIB
