"""Logging set-up: JSON lines in production, a readable console on a TTY, no warning floods."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, BinaryIO

import orjson
import structlog

WARNING_INTERVAL_SECONDS = 10.0
RATE_LIMITED_LEVELS = frozenset({"warning", "error"})


class RepeatLimiter:
    """A structlog processor that lets one identical warning or error through per interval.

    "Identical" means the same level, event and fields (timestamps excepted); the next one let
    through after a quiet spell says how many were suppressed. Request lines are info: never
    limited.
    """

    def __init__(
        self,
        interval: float = WARNING_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Drop a repeat inside the interval; count it for the next one let through."""
        if method not in RATE_LIMITED_LEVELS:
            return event
        signature = repr(sorted((k, repr(v)) for k, v in event.items() if k != "timestamp"))
        signature = f"{method}:{signature}"
        now = self._clock()
        last = self._last.get(signature)
        if last is not None and now - last[0] < self._interval:
            self._last[signature] = (last[0], last[1] + 1)
            raise structlog.DropEvent
        if last is not None and last[1]:
            event["suppressed_repeats"] = last[1]
        self._last[signature] = (now, 0)
        if len(self._last) > 10_000:  # bounded: forget the oldest signatures
            for stale in list(self._last)[:5_000]:
                del self._last[stale]
        return event


class IsoTimeStamper:
    """A structlog processor that adds `timestamp`: UTC, ISO 8601 with microseconds and a `Z`,
    as structlog's `TimeStamper(fmt="iso", utc=True)` writes it, the date and time formatted
    once per second (it runs for every request line)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second = -1
        self._formatted = ""

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Stamp the event with the current time."""
        event["timestamp"] = self.stamp()
        return event

    def stamp(self) -> str:
        """The current time as the `timestamp` field reads."""
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._formatted = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._formatted}.{int((now - second) * 1_000_000):06d}Z"


class JsonLines:
    """The JSON renderer ending the production chain, which can also write an info line itself.

    `info` writes the bytes the chain would for an info event with no exception (the limiter
    passes info, the level and timestamp come last, orjson renders) without running the chain:
    the request line is on the hot path. It is used only while this chain is the configured one,
    so a test's `capture_logs` still sees every event.
    """

    def __init__(self, file: BinaryIO, stamper: IsoTimeStamper, level: int) -> None:
        self._file = file
        self._stamper = stamper
        self._writes_info = level <= logging.INFO
        self.chain: list[structlog.typing.Processor] = []

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> bytes:
        """Render one event as a JSON line (anything unusual becomes its str())."""
        return orjson.dumps(event, default=str)

    def info(self, event: str, fields: dict[str, Any]) -> None:
        """Write `fields` (taken over) as the chain would write `logger.info(event, **fields)`."""
        if not self._writes_info:
            return
        fields["event"] = event
        fields["level"] = "info"
        fields["timestamp"] = self._stamper.stamp()
        self._file.write(orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE))
        self._file.flush()


def json_lines() -> JsonLines | None:
    """The production JSON renderer while its chain is the configured one, else None."""
    processors = structlog.get_config()["processors"]
    renderer = processors[-1] if processors else None
    if isinstance(renderer, JsonLines) and renderer.chain is processors:
        return renderer
    return None


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """JSON lines in production, a readable console on a TTY; one configuration per process."""
    use_json = not sys.stderr.isatty() if json is None else json
    threshold = logging.getLevelName(level.upper())
    stamper = IsoTimeStamper()
    renderer: structlog.typing.Processor
    factory: Callable[..., Any]
    if use_json:
        renderer = JsonLines(sys.stderr.buffer, stamper, threshold)
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    processors: list[structlog.typing.Processor] = [
        # No context variables are bound anywhere: merging them would only cost time.
        RepeatLimiter(),
        structlog.processors.add_log_level,
        stamper,
        # Tracebacks as data, but never with frame locals: they can hold keys and prompts.
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        if use_json
        else structlog.dev.set_exc_info,
        renderer,
    ]
    if isinstance(renderer, JsonLines):
        renderer.chain = processors
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
