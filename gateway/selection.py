"""The selection seam: (request context, candidates, process state) → an ordered failover list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.catalog import Key, Provider


@dataclass(frozen=True)
class RequestContext:
    """What the policy may know about one request (never its prompt)."""

    request_id: str
    key: Key
    model: str
    stream: bool


@dataclass
class SelectionState:
    """Per-process routing state the policy reads and advances."""

    next_index: dict[str, int] = field(default_factory=dict)


def failover_order(
    context: RequestContext, candidates: Sequence[Provider], state: SelectionState
) -> list[Provider]:
    """Round robin per model: each request starts one provider further, the rest follow in turn."""
    if not candidates:
        return []
    start = state.next_index.get(context.model, 0) % len(candidates)
    state.next_index[context.model] = start + 1
    return [*candidates[start:], *candidates[:start]]
