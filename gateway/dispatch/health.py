"""Per-process provider health: runs of failures, cooldowns with back-off, and 429 waits.

Cooldowns are per process on purpose: each worker learns a provider is sick within
`allowed_fails` of its own requests, with no shared state to keep consistent or to lose.

Failures come in three kinds (see `gateway.dispatch.blame`): an unreachable provider (no
connection) always counts; a provider fault a request cannot cause (503, a malformed answer)
counts; a failure one request could have caused (an upstream 5xx, a timeout after the upstream
accepted the request) counts only once a run of failures holds such failures from at least two
keys, so one key alone never cools a provider. Only an unreachable provider or a 429 cools
beyond `max_cooling_fraction` of a model's providers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from gateway.config_service import RoutingSettings

logger = structlog.get_logger("gateway.dispatch.health")

# Two keys in a run are what tells a provider's fault from one client's requests.
KEYS_FOR_BLAME = 2


@dataclass
class _State:
    consecutive_failures: int = 0
    # Failures of the run no request could have caused.
    provider_faults: int = 0
    # Keys whose requests failed in the run (at most KEYS_FOR_BLAME are kept: enough to tell).
    keys: set[str] = field(default_factory=set)
    # The run reached `allowed_fails` but the share forbade a cooldown (logged once per run).
    withheld: bool = False
    cooldowns_in_a_row: int = 0
    cooling_until: float = 0.0

    def end_run(self) -> None:
        self.consecutive_failures = 0
        self.provider_faults = 0
        self.keys.clear()
        self.withheld = False


class ProviderHealth:
    """Which providers are cooling down, and until when."""

    def __init__(
        self,
        routing: RoutingSettings,
        *,
        serving: Mapping[str, Iterable[str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_withheld: Callable[[str], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_withheld = on_withheld
        self._states: dict[str, _State] = {}
        self._models_of: dict[str, list[tuple[str, ...]]] = {}
        self._configure(routing, serving or {})

    def _configure(self, routing: RoutingSettings, serving: Mapping[str, Iterable[str]]) -> None:
        self._allowed_fails = routing.allowed_fails
        self._base = routing.cooldown_seconds
        self._cap = routing.cooldown_max_seconds
        self._max_cooling_fraction = routing.max_cooling_fraction
        models_of: dict[str, list[tuple[str, ...]]] = {}
        for members in serving.values():
            group = tuple(members)
            for name in group:
                models_of.setdefault(name, []).append(group)
        self._models_of = models_of

    def reconfigure(
        self,
        routing: RoutingSettings,
        providers: Iterable[str],
        serving: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """Apply reloaded cooldown settings and which providers serve each model; providers that
        stay keep their state."""
        self._configure(routing, serving or {})
        kept = set(providers)
        for name in [name for name in self._states if name not in kept]:
            del self._states[name]

    def _state(self, provider: str) -> _State:
        state = self._states.get(provider)
        if state is None:
            state = self._states[provider] = _State()
        return state

    def cooling(self, provider: str) -> bool:
        """Whether the provider is cooling down now."""
        state = self._states.get(provider)
        return state is not None and state.cooling_until > self._clock()

    def cooling_remaining(self, provider: str) -> float:
        """Seconds of cooldown left (0 when not cooling)."""
        state = self._states.get(provider)
        return 0.0 if state is None else max(0.0, state.cooling_until - self._clock())

    def withholding(self, provider: str) -> bool:
        """Whether the provider's current run of failures earned a cooldown the share withheld
        (it stays in rotation while failing)."""
        state = self._states.get(provider)
        return state is not None and state.withheld

    def soonest_recovery(self, providers: Iterable[str]) -> float:
        """Seconds until the first of these providers stops cooling."""
        return min((self.cooling_remaining(name) for name in providers), default=0.0)

    def succeeded(self, provider: str) -> None:
        """A success ends the run of failures and resets the back-off."""
        state = self._states.get(provider)
        if state is not None:
            state.end_run()
            state.cooldowns_in_a_row = 0

    def unreachable(self, provider: str) -> bool:
        """Count a failure to connect; after `allowed_fails` in a row, cool down whatever share
        of a model's providers is cooling already. True when it started a cooldown."""
        state = self._state(provider)
        state.consecutive_failures += 1
        state.provider_faults += 1
        if state.provider_faults < self._allowed_fails:
            return False
        self._start_cooldown(state)
        return True

    def failed(self, provider: str, key: str | None = None) -> bool:
        """Count a failure: a provider fault, or (with `key`) one that key's request may have
        caused. After `allowed_fails` in a row — counting the key-caused ones only once the run
        holds them from two keys — cool down, unless that would take the cooling share of one of
        its models past `max_cooling_fraction`. True when it started a cooldown."""
        state = self._state(provider)
        state.consecutive_failures += 1
        if key is None:
            state.provider_faults += 1
        elif len(state.keys) < KEYS_FOR_BLAME:
            state.keys.add(key)
        counted = (
            state.consecutive_failures
            if len(state.keys) >= KEYS_FOR_BLAME
            else state.provider_faults
        )
        if counted < self._allowed_fails:
            return False
        if not self._within_share(provider):
            if not state.withheld:
                state.withheld = True
                logger.warning(
                    "cooldown_withheld",
                    provider=provider,
                    failures=state.consecutive_failures,
                    max_cooling_fraction=self._max_cooling_fraction,
                    detail="cooling it would take a model past its share of cooling providers",
                )
                if self._on_withheld is not None:
                    self._on_withheld(provider)
            return False
        self._start_cooldown(state)
        return True

    def rate_limited(self, provider: str, retry_after: float | None) -> None:
        """A 429: cool for its Retry-After (capped), or the base cooldown when it gave none."""
        seconds = self._base if retry_after is None else retry_after
        self._cool(self._state(provider), min(seconds, self._cap))

    def _within_share(self, provider: str) -> bool:
        """Whether one more cooling provider keeps each of its models within the share."""
        for members in self._models_of.get(provider, ()):
            cooling = sum(1 for name in members if name != provider and self.cooling(name))
            if cooling + 1 > math.floor(self._max_cooling_fraction * len(members) + 1e-9):
                return False
        return True

    def _start_cooldown(self, state: _State) -> None:
        seconds = min(self._base * 2**state.cooldowns_in_a_row, self._cap)
        state.cooldowns_in_a_row += 1
        state.end_run()
        self._cool(state, seconds)

    def _cool(self, state: _State, seconds: float) -> None:
        if math.isfinite(seconds) and seconds > 0:
            state.cooling_until = max(state.cooling_until, self._clock() + seconds)
