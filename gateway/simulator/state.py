"""Everything one simulated node owns while it runs."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.simulator.engine import Engine
from gateway.simulator.options import Faults, SimulatorOptions
from gateway.simulator.prefix_cache import PrefixCache
from gateway.simulator.stats import SimulatorStats

# A node that answers any model must not grow without bound on clients' made-up model names.
MODELS_SEEN_LIMIT = 100

Refuse = Callable[[float, asyncio.BaseTransport | None], Awaitable[None]]


class SimulatorState:
    """The node's engine, stats, current faults and request numbering."""

    def __init__(self, options: SimulatorOptions) -> None:
        """Build a fresh node from its options, with the start-up faults applied."""
        self.options = options
        self.engine = Engine(options.timing, PrefixCache(options.cache_tokens))
        self.stats = SimulatorStats(self.engine, options.recent_requests)
        self.random = random.Random(options.name)
        self.models_seen: dict[str, int] = {}
        # Stored `/v1/responses` objects: only this node can continue them.
        self.responses: dict[str, dict[str, Any]] = {}
        # Set by the server that listens for this node: control calls use it to go "down".
        self.refuse: Refuse | None = None
        self.faults = Faults()
        self.apply_faults(options.faults)
        self._request_number = 0

    @property
    def metrics_model_name(self) -> str:
        """The `model_name` label of the vLLM metrics: the first configured model, else "any"."""
        return self.options.models[0] if self.options.models else "any"

    def apply_faults(self, faults: Faults) -> None:
        """Make `faults` current, pausing or resuming the engine for `hold`."""
        self.faults = faults
        if faults.hold:
            self.engine.pause()
        else:
            self.engine.resume()

    def remember_model(self, model: str) -> None:
        """Note a model asked for, for `/v1/models`; a bounded number, first come first kept."""
        if model not in self.models_seen and len(self.models_seen) < MODELS_SEEN_LIMIT:
            self.models_seen[model] = int(time.time())

    def serves(self, model: str) -> bool:
        """Whether this node answers `model` (any model when none are configured)."""
        return not self.options.models or model in self.options.models

    def next_request_number(self) -> int:
        """Number the next completion request, from 1."""
        self._request_number += 1
        return self._request_number


STATE_KEY = web.AppKey("simulator_state", SimulatorState)
