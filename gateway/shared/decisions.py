"""The recent-decisions ring: the last requests' outcomes, recorded by the edge and shown on
`/admin/status`; ids and outcomes only, never a key or a prompt."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

# How many requests' decisions a worker keeps.
RECENT_DECISIONS = 50


@dataclass(frozen=True)
class RecentDecision:
    """One recent request: ids and outcome, never a key or a prompt."""

    at: float  # Unix time
    request_id: str
    key_id: str | None
    model: str | None
    provider: str | None
    affinity: str
    attempts: tuple[str, ...]
    status: int
    duration_ms: float


# A RecentDecision's fields in order, as a request records them (a tuple costs far less to make).
DecisionFields = tuple[
    float, str, str | None, str | None, str | None, str, tuple[str, ...], int, float
]


class RecentDecisions:
    """The last requests' decisions, kept as tuples and read as `RecentDecision` rows."""

    def __init__(self, limit: int) -> None:
        self._rows: deque[DecisionFields] = deque(maxlen=limit)

    def add(self, fields: DecisionFields) -> None:
        """Keep one request's decision (`RecentDecision`'s fields in order), the oldest going."""
        self._rows.append(fields)

    def __iter__(self) -> Iterator[RecentDecision]:
        """The kept decisions, oldest first."""
        return (RecentDecision(*fields) for fields in list(self._rows))

    def __len__(self) -> int:
        return len(self._rows)
