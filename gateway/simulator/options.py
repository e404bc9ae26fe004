"""Settings of one simulated node: timing, cache size and the fault flags."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Mode(enum.StrEnum):
    """How the node answers completion requests; everything but `normal` is hostile."""

    NORMAL = "normal"
    INVALID_JSON = "invalid_json"
    WRONG_CONTENT_TYPE = "wrong_content_type"
    MALFORMED_SSE = "malformed_sse"
    ENDLESS_BODY = "endless_body"
    HANG_AFTER_HEADERS = "hang_after_headers"


@dataclass(frozen=True)
class Timing:
    """Latency model: TTFT = base + per-token cost of the uncached prompt, then a token rate.

    A `tokens_per_second` of zero means output is not paced at all; `ttft_jitter_ms` adds a
    uniformly drawn extra of up to that much to every TTFT (a node whose latency is noisy).
    """

    base_ttft_ms: float = 20.0
    per_token_ms: float = 0.05
    tokens_per_second: float = 100.0
    max_num_seqs: int = 256
    ttft_jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        """Reject negative times and a non-positive sequence bound."""
        if (
            min(self.base_ttft_ms, self.per_token_ms, self.tokens_per_second, self.ttft_jitter_ms)
            < 0
        ):
            raise ValueError("timing values must not be negative")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")

    @classmethod
    def instant(cls, max_num_seqs: int = 256) -> Timing:
        """Timing that never sleeps: zero TTFT and an unlimited token rate."""
        return cls(
            base_ttft_ms=0.0, per_token_ms=0.0, tokens_per_second=0.0, max_num_seqs=max_num_seqs
        )


@dataclass(frozen=True)
class Faults:
    """Faults injected on demand; the defaults describe a healthy node."""

    slow: float = 1.0
    error_rate: float = 0.0
    rate_limit_retry_after: int | None = None
    drop_after_chunks: int | None = None
    extra_waiting: int = 0
    # The KV-cache usage `/metrics` reports instead of the running sequences' (0 to 1).
    kv_cache_usage: float | None = None
    # While true, admitted sequences wait before their first token: tests use it to pin
    # requests in flight without timing.
    hold: bool = False
    mode: Mode = Mode.NORMAL
    # A request-specific bug: a completion request whose body holds this text is answered 500.
    error_on_text: str | None = None

    def __post_init__(self) -> None:
        """Reject values outside their meaningful ranges."""
        if self.slow < 0:
            raise ValueError("slow must not be negative")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if self.rate_limit_retry_after is not None and self.rate_limit_retry_after < 0:
            raise ValueError("rate_limit_retry_after must not be negative")
        if self.drop_after_chunks is not None and self.drop_after_chunks < 0:
            raise ValueError("drop_after_chunks must not be negative")
        if self.extra_waiting < 0:
            raise ValueError("extra_waiting must not be negative")
        if self.kv_cache_usage is not None and not 0.0 <= self.kv_cache_usage <= 1.0:
            raise ValueError("kv_cache_usage must be between 0 and 1")
        if self.error_on_text == "":
            raise ValueError("error_on_text must not be empty")

    def updated(self, changes: Mapping[str, Any]) -> Faults:
        """These faults with a JSON-shaped partial update applied; ValueError if it is invalid."""
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in _FAULT_CHECKS:
                raise ValueError(f"unknown fault {name!r}")
            values[name] = _FAULT_CHECKS[name](name, value)
        return dataclasses.replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        """The faults as a JSON-ready mapping."""
        values = dataclasses.asdict(self)
        values["mode"] = self.mode.value
        return values


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    return float(value)


def _optional_number(name: str, value: Any) -> float | None:
    return None if value is None else _number(name, value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _optional_count(name: str, value: Any) -> int | None:
    return None if value is None else _count(name, value)


def _optional_text(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or null")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


def _mode(name: str, value: Any) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        choices = ", ".join(mode.value for mode in Mode)
        raise ValueError(f"{name} must be one of {choices}") from None


_FAULT_CHECKS: Mapping[str, Callable[[str, Any], Any]] = {
    "slow": _number,
    "error_rate": _number,
    "rate_limit_retry_after": _optional_count,
    "drop_after_chunks": _optional_count,
    "extra_waiting": _count,
    "kv_cache_usage": _optional_number,
    "hold": _flag,
    "mode": _mode,
    "error_on_text": _optional_text,
}


def refuse_seconds_from(value: Any) -> float:
    """Validate a `refuse_seconds` request value: a non-negative number of seconds."""
    seconds = _number("refuse_seconds", value)
    if seconds < 0:
        raise ValueError("refuse_seconds must not be negative")
    return seconds


@dataclass(frozen=True)
class SimulatorOptions:
    """Everything one simulated node needs to start."""

    name: str = "simulator"
    host: str = "127.0.0.1"
    port: int = 0
    models: tuple[str, ...] = ()
    timing: Timing = field(default_factory=Timing)
    cache_tokens: int = 200_000
    default_max_tokens: int = 16
    recent_requests: int = 50
    faults: Faults = field(default_factory=Faults)
    refuse_seconds: float = 0.0

    def __post_init__(self) -> None:
        """Reject sizes that cannot work."""
        if self.cache_tokens < 0:
            raise ValueError("cache_tokens must not be negative")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if self.recent_requests < 0:
            raise ValueError("recent_requests must not be negative")
        if self.refuse_seconds < 0:
            raise ValueError("refuse_seconds must not be negative")
