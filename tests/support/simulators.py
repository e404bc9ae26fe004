"""Simulated upstream nodes for tests: in-process on port 0, or as real processes."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from bench import launcher
from gateway.simulator import Faults, SimulatorOptions, SimulatorServer, Timing
from gateway.simulator.options import refuse_seconds_from


@dataclass(frozen=True)
class RecordedRequest:
    """One completion request as the node received it, and when it answered it."""

    request_id: str
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    received_at: float
    first_token_at: float | None
    generation_finished_at: float | None
    finished_at: float | None
    outcome: str | None
    status: int | None
    prompt_tokens: int | None
    cached_tokens: int | None

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> RecordedRequest:
        """Parse one entry of `recent_requests` from `/sim/stats`."""
        headers: CIMultiDict[str] = CIMultiDict(
            (str(name), str(value)) for name, value in payload["headers"]
        )
        return cls(
            request_id=payload["request_id"],
            method=payload["method"],
            path=payload["path"],
            headers=CIMultiDictProxy(headers),
            body=base64.b64decode(payload["body_base64"]),
            received_at=payload["received_at"],
            first_token_at=payload["first_token_at"],
            generation_finished_at=payload["generation_finished_at"],
            finished_at=payload["finished_at"],
            outcome=payload["outcome"],
            status=payload["status"],
            prompt_tokens=payload["prompt_tokens"],
            cached_tokens=payload["cached_tokens"],
        )


@dataclass(frozen=True)
class NodeStats:
    """What one node saw since its last reset (see `/sim/stats`)."""

    monotonic_now: float
    requests_received: int
    requests_by_path: Mapping[str, int]
    completed: int
    cancelled: int
    outcomes: Mapping[str, int]
    in_flight: int
    peak_in_flight: int
    running: int
    waiting: int
    peak_running: int
    peak_waiting: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_used_tokens: int
    last_cancelled_at: float | None
    recent_requests: tuple[RecordedRequest, ...] = field(default=())

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> NodeStats:
        """Parse the body of `/sim/stats`."""
        values = dict(payload)
        values["recent_requests"] = tuple(
            RecordedRequest.from_json(entry) for entry in payload["recent_requests"]
        )
        return cls(**values)

    @property
    def completion_requests(self) -> int:
        """Completion requests received (chat and legacy), leaving out /metrics scrapes."""
        return sum(
            self.requests_by_path.get(path, 0)
            for path in ("/v1/chat/completions", "/v1/completions")
        )

    def last_request(self) -> RecordedRequest:
        """The most recent completion request; AssertionError when there was none."""
        assert self.recent_requests, "the node has not received a completion request"
        return self.recent_requests[-1]


class InProcessSimulator:
    """A node served on 127.0.0.1:0 inside the test's own event loop."""

    def __init__(
        self,
        name: str = "sim",
        *,
        timing: Timing | None = None,
        faults: Faults | None = None,
        models: Sequence[str] = (),
        cache_tokens: int = 200_000,
        default_max_tokens: int = 16,
        recent_requests: int = 50,
    ) -> None:
        """Describe the node; it serves between `__aenter__` and `__aexit__`. Times default to 0."""
        options = SimulatorOptions(
            name=name,
            models=tuple(models),
            timing=timing or Timing.instant(),
            cache_tokens=cache_tokens,
            default_max_tokens=default_max_tokens,
            recent_requests=recent_requests,
            faults=faults or Faults(),
        )
        # A short graceful period: held or hanging requests must not slow test teardown.
        self.server = SimulatorServer(options, shutdown_timeout=0.2)

    @property
    def name(self) -> str:
        """The node's name, as sent in `x-simulator-node`."""
        return self.server.name

    @property
    def url(self) -> str:
        """The base URL, e.g. `http://127.0.0.1:41234`."""
        return self.server.url

    async def __aenter__(self) -> Self:
        """Start listening."""
        try:
            await self.server.start()
        except BaseException:
            await self.server.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop listening and end the requests in flight."""
        await self.server.stop()

    async def stats(self) -> NodeStats:
        """The node's stats, exactly as `/sim/stats` would report them."""
        return NodeStats.from_json(self.server.state.stats.to_json())

    async def set_faults(self, **changes: Any) -> Faults:
        """Apply a partial fault update, as `POST /sim/faults` does; ValueError if invalid."""
        refuse_seconds = changes.pop("refuse_seconds", None)
        faults = self.server.state.faults.updated(changes)
        self.server.state.apply_faults(faults)
        if refuse_seconds is not None:
            await self.server.refuse(refuse_seconds_from(refuse_seconds))
        return faults

    async def reset(self, *, clear_cache: bool = False) -> None:
        """Zero the stats; optionally empty the prefix cache."""
        if clear_cache:
            self.server.state.engine.cache.clear()
        self.server.state.stats.reset()


class SimulatorProcess(launcher.SimulatorProcess):
    """A node run as a real process by `bench.launcher`, with its control routes as methods."""

    async def stats(self) -> NodeStats:
        """The node's `/sim/stats`."""
        return NodeStats.from_json(await self._control("GET", "/sim/stats"))

    async def set_faults(self, **changes: Any) -> dict[str, Any]:
        """`POST /sim/faults` with a partial update; returns the faults now in force."""
        return await self._control("POST", "/sim/faults", changes)

    async def reset(self, *, clear_cache: bool = False) -> None:
        """`POST /sim/reset`."""
        await self._control("POST", "/sim/reset", {"clear_cache": clear_cache})

    async def _control(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.url + path, json=payload) as response,
        ):
            response.raise_for_status()
            body: dict[str, Any] = await response.json()
            return body
