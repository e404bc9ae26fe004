"""Freed request memory handed back to the operating system.

glibc's malloc keeps what a process frees for its next allocations: a large buffer freed in the
middle of the heap, or in a thread's arena, stays in the process's RSS. After an upload's 8 MB
replay copy (grown piece by piece) and its pieces are freed, the worker's RSS stayed 20-26 MiB
over its baseline with no object left holding them. `malloc_trim(0)` returns every free page;
it walks the heap (a few ms for hundreds of MB), so it runs at most once per gauge refresh: when
`TRIM_AFTER_BYTES` of budgeted memory were given back since the last one, or when the traffic
that held some is over (nothing held now, at least `TRIM_IDLE_BYTES` given back), so what the
last requests freed is returned too. What is freed just after (the closing connections' buffers,
the rest of a body read and dropped) is returned by `FOLLOW_UPS` more trims at the next
refreshes while nothing is held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_AFTER_BYTES = 8 * 1024 * 1024
"""Budgeted bytes given back before a trim is worth its walk of the heap."""

TRIM_IDLE_BYTES = 1024 * 1024
"""Given back since the last trim: with nothing held any more, enough for one more trim."""

FOLLOW_UPS = 3
"""Refreshes after a trim that trim again while nothing is held."""


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


class Trimmer:
    """Counts the bytes given back; trims once enough were, when asked (at each gauge refresh)."""

    def __init__(self, trim: Callable[[int], int] | None = _TRIM) -> None:
        self._trim = trim
        self._given_back = 0
        self._follow_ups = 0
        self.trims = 0

    def given_back(self, size: int) -> None:
        """`size` bytes of a request were let go."""
        self._given_back += size

    def settle(self, held: int) -> bool:
        """Trim if enough was given back since the last trim (less will do when nothing is
        `held` now), or as a follow-up of a recent one; whether it did."""
        if self._trim is None:
            return False
        enough = TRIM_AFTER_BYTES if held else TRIM_IDLE_BYTES
        if self._given_back >= enough:
            self._follow_ups = FOLLOW_UPS
        elif held == 0 and self._follow_ups > 0:
            self._follow_ups -= 1
        else:
            return False
        self._given_back = 0
        self._trim(0)
        self.trims += 1
        return True
