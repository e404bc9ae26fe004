"""Live reload: re-read the config, keep what cannot change live, and swap the worker's runtime.

Keys, providers (added, removed, re-weighted, draining), groups, models, orgs and their `auto`
routes, limits, the admin token, the drain delay and the per-request routing settings apply at
once. The fields in `RESTART_ONLY` are bound to listeners, processes, pools or learnt state when
a worker starts: a reload keeps their running values and reports each one that differs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import structlog
from pydantic import BaseModel

from gateway.config import Settings
from gateway.config_loading import ConfigError, load_config
from gateway.config_service import DatabaseSettings
from gateway.operations.runtime import ProcessState, RuntimeHolder, build_runtime
from gateway.shared.metrics import Metrics

logger = structlog.get_logger("gateway.operations.reload")
ModelT = TypeVar("ModelT", bound=BaseModel)

# Why each needs a restart: the listener and its connection limits, the worker processes, the
# request-size limit of the app, the database pool, the shared-affinity component, the upstream
# clients, and the shape of the per-process memory (latency window, session table) and
# of the load poller, and the load shedder; the usage book and its flusher.
RESTART_ONLY: tuple[str, ...] = (
    "server.host",
    "server.port",
    "server.workers",
    "server.max_body_bytes",
    "server.metrics_port",
    "server.shutdown_timeout_seconds",
    "server.header_read_timeout_seconds",
    "server.body_read_timeout_seconds",
    "server.keepalive_timeout_seconds",
    "server.max_header_bytes",
    "server.max_header_count",
    "server.max_connections_per_worker",
    "server.memory_budget_bytes",
    "server.memory_share_per_key",
    "server.max_buffered_answer_bytes",
    "server.load_shedding",
    "server.load_shedding_burst_seconds",
    "database",
    "affinity",
    "usage",
    "routing.connect_timeout_seconds",
    "routing.latency_window_seconds",
    "routing.latency_sample_max_age_seconds",
    "routing.node_latency_window_seconds",
    "routing.session_ttl_seconds",
    "routing.session_capacity",
    "routing.load_poll_interval_seconds",
)

ReloadResult = Literal["applied", "invalid", "failed"]


def keep_restart_only(running: Settings, new: Settings) -> tuple[Settings, tuple[str, ...]]:
    """`new`, with every restart-only field at its running value; and the fields the config
    changed (a running value derived at start, the embedded Postgres's URL, is compared as the
    config gave it)."""
    differing = tuple(
        path for path in RESTART_ONLY if _get(new, path) != _as_configured(_get(running, path))
    )
    effective = new
    for path in RESTART_ONLY:
        if _get(new, path) != _get(running, path):
            effective = _set(effective, path, _get(running, path))
    return effective, differing


def _as_configured(value: object) -> object:
    return value.as_configured() if isinstance(value, DatabaseSettings) else value


def _get(settings: BaseModel, path: str) -> object:
    value: object = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _set(settings: Settings, path: str, value: object) -> Settings:
    return _replaced(settings, path.split("."), value)


def _replaced(model: ModelT, parts: list[str], value: object) -> ModelT:
    head, *rest = parts
    if rest:
        value = _replaced(getattr(model, head), rest, value)
    return model.model_copy(update={head: value})


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did."""

    result: ReloadResult
    errors: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    digest: str = ""


class Reloader:
    """Reloads one worker's runtime from a config file."""

    def __init__(self, holder: RuntimeHolder, state: ProcessState, metrics: Metrics) -> None:
        self._holder = holder
        self._state = state
        self._metrics = metrics
        self._attempts = 0

    def reload(self, path: str | Path) -> ReloadOutcome:
        """Validate the file and apply it; an invalid one is refused and the running one stays."""
        self._attempts += 1  # numbered, so a repeated refusal is never dropped as a repeat
        try:
            loaded = load_config(path)
        except ConfigError as error:
            errors = tuple(str(problem) for problem in error.problems)
            # Problems name paths and reasons, never a value: no secret reaches the log.
            logger.error(
                "config_reload_refused", path=str(path), errors=list(errors), attempt=self._attempts
            )
            self._metrics.config_reloads.labels("invalid").inc()
            return ReloadOutcome("invalid", errors=errors)
        running = self._holder.current
        effective, restart_needed = keep_restart_only(running.settings, loaded.settings)
        try:
            runtime = build_runtime(effective, self._state, restart_needed=restart_needed)
        except Exception:
            logger.exception("config_reload_failed", path=str(path), attempt=self._attempts)
            self._metrics.config_reloads.labels("failed").inc()
            return ReloadOutcome("failed")
        self._holder.current = runtime
        self._metrics.config_reloads.labels("applied").inc()
        logger.info(
            "config_reloaded",
            path=str(path),
            digest=runtime.digest,
            providers=len(runtime.catalog.providers),
            draining=_names(p.name for p in runtime.catalog.providers.values() if p.draining),
            keys=len(runtime.catalog.keys),
            warnings=[str(warning) for warning in loaded.warnings],
            restart_needed=list(restart_needed),
        )
        if restart_needed:
            logger.warning(
                "config_restart_needed",
                fields=list(restart_needed),
                attempt=self._attempts,
                detail="these settings keep their running values until the gateway restarts",
            )
        return ReloadOutcome("applied", restart_needed=restart_needed, digest=runtime.digest)


def _names(names: Iterable[str]) -> list[str]:
    return sorted(names)
