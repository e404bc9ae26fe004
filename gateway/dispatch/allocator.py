"""Freed request memory handed back to the operating system.

glibc's malloc keeps what a process frees for its next allocations: a large buffer freed in the
middle of the heap, or in a thread's arena, stays in the process's RSS. After an upload's 8 MB
replay copy (grown piece by piece) and its pieces are freed, the worker's RSS stayed 20-26 MiB
over its baseline with no object left holding them. `malloc_trim(0)` returns every free page;
it walks the heap (a few ms for hundreds of MB), so it runs at most once per gauge refresh: when
`TRIM_AFTER_BYTES` of budgeted memory were given back since the last one, or, while nothing is
held, when `TRIM_IDLE_BYTES` were given back or the resident size grew that much past what the
last trim left. The last rule returns what is freed after the traffic, at whatever moment (the
closing connections' buffers, the rest of a body read and dropped, a request that outlived its
client): a fixed number of follow-up trims missed what a loaded machine freed later. Memory that
stays in use moves the mark up, so it costs one trim, not one per refresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

TRIM_AFTER_BYTES = 8 * 1024 * 1024
"""Budgeted bytes given back before a trim is worth its walk of the heap."""

TRIM_IDLE_BYTES = 1024 * 1024
"""Given back since the last trim: with nothing held any more, enough for one more trim."""

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


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


def resident_bytes() -> int | None:
    """This process's resident size (None where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


_TRIM = _malloc_trim()


class Trimmer:
    """Counts the bytes given back; trims once enough were, when asked (at each gauge refresh)."""

    def __init__(
        self,
        trim: Callable[[int], int] | None = _TRIM,
        resident: Callable[[], int | None] = resident_bytes,
    ) -> None:
        self._trim = trim
        self._resident = resident
        self._given_back = 0
        self._resident_after_trim: int | None = None
        self.trims = 0

    def given_back(self, size: int) -> None:
        """`size` bytes of a request were let go."""
        self._given_back += size

    def settle(self, held: int) -> bool:
        """Trim if enough was given back since the last trim (less will do when nothing is
        `held` now), or, with nothing held, if the process grew since; whether it did."""
        if self._trim is None:
            return False
        enough = TRIM_AFTER_BYTES if held else TRIM_IDLE_BYTES
        if self._given_back < enough and not (held == 0 and self._grown()):
            return False
        self._given_back = 0
        self._trim(0)
        self._resident_after_trim = self._resident()
        self.trims += 1
        return True

    def _grown(self) -> bool:
        """Whether the resident size is `TRIM_IDLE_BYTES` past what the last trim left (the first
        call only takes the mark)."""
        resident = self._resident()
        if resident is None:
            return False
        if self._resident_after_trim is None:
            self._resident_after_trim = resident
            return False
        return resident - self._resident_after_trim >= TRIM_IDLE_BYTES
