"""The cluster on the status page: every live worker as its last heartbeat described itself.

Each worker's heartbeat (see `gateway.dispatch.cluster_shares`) carries `describe_worker`'s
small snapshot into the store; any worker's page reads every live one back, bounded by a short
timeout, and shows a card per worker (this worker's own marked) and the cluster's totals.
"""

# The store contract takes a per-call `timeout`, enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from importlib import metadata
from typing import Any

from affinity_store.store import AffinityStore, StoreError

try:
    VERSION = metadata.version("affinity-gateway")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "unknown"


def describe_worker(
    *, in_flight: int, shedding: bool, cooling: Sequence[str], config_digest: str, draining: bool
) -> dict[str, Any]:
    """This worker's snapshot for its heartbeat: a few hundred bytes, no key, no prompt."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "in_flight": in_flight,
        "shedding": shedding,
        "cooling": sorted(cooling),
        "config_digest": config_digest,
        "version": VERSION,
        "draining": draining,
    }


@dataclass(frozen=True)
class WorkerCard:
    """One live worker as the page shows it (fields absent from an older snapshot are empty)."""

    worker_id: str
    started_at: datetime
    own: bool
    pid: int | None
    host: str
    in_flight: int
    shedding: bool
    draining: bool
    cooling: tuple[str, ...]
    config_digest: str
    version: str


@dataclass(frozen=True)
class ClusterSection:
    """Every live worker; `available` is False when the store did not answer in time."""

    available: bool
    workers: Sequence[WorkerCard] = ()

    @property
    def in_flight(self) -> int:
        """Requests in flight over the cluster."""
        return sum(worker.in_flight for worker in self.workers)

    @property
    def configs(self) -> int:
        """How many distinct configs the workers run (more than one: a reload is under way)."""
        return len({worker.config_digest for worker in self.workers if worker.config_digest})


async def collect_cluster(
    store: AffinityStore, own_worker_id: str, *, timeout: float
) -> ClusterSection:
    """Every live worker's last snapshot, this one's marked; unavailable when the store is down."""
    try:
        snapshots = await store.worker_snapshots(timeout=timeout)
    except StoreError:
        return ClusterSection(available=False)
    return ClusterSection(
        available=True,
        workers=[
            _card(
                row.worker_id,
                row.started_at,
                row.snapshot or {},
                own=row.worker_id == own_worker_id,
            )
            for row in snapshots
        ],
    )


def _card(
    worker_id: str, started_at: datetime, snapshot: Mapping[str, Any], *, own: bool
) -> WorkerCard:
    """A card from a snapshot read back from the store: only well-typed fields are used."""
    pid = snapshot.get("pid")
    cooling = snapshot.get("cooling")
    in_flight = snapshot.get("in_flight")
    return WorkerCard(
        worker_id=worker_id,
        started_at=started_at,
        own=own,
        pid=pid if isinstance(pid, int) else None,
        host=str(snapshot.get("host", "")),
        in_flight=in_flight if isinstance(in_flight, int) else 0,
        shedding=snapshot.get("shedding") is True,
        draining=snapshot.get("draining") is True,
        cooling=tuple(str(name) for name in cooling) if isinstance(cooling, list) else (),
        config_digest=str(snapshot.get("config_digest", "")),
        version=str(snapshot.get("version", "")),
    )


def render_cluster(section: ClusterSection | None) -> str:
    """The cluster's HTML: totals and one card per live worker, this worker's marked."""
    if section is None:
        return ""
    if not section.available:
        body = (
            '<p class="legend"><span class="badge bad">store down</span> the live workers could '
            "not be read; the rest of this page is this worker's own view.</p>"
        )
        return f'<section id="cluster"><h2>Cluster</h2>{body}</section>'
    workers = section.workers
    shedding = sum(1 for worker in workers if worker.shedding)
    cooling = sorted({name for worker in workers for name in worker.cooling})
    totals = (
        f'<div class="cards" id="cluster-totals">'
        f"{_total('Live workers', str(len(workers)))}"
        f"{_total('In flight', str(section.in_flight))}"
        f"{_total('Shedding', str(shedding))}"
        f"{_total('Cooling providers', escape(', '.join(cooling)) or '0')}"
        f"{_total('Configs', str(section.configs))}"
        "</div>"
    )
    cards = "".join(_worker_card(worker) for worker in workers)
    legend = (
        "Every live worker of every replica sharing this store, as its last heartbeat (each "
        "second) described it. Two configs: a reload has not reached every worker yet."
    )
    return (
        '<section id="cluster"><h2>Cluster</h2>'
        f'<p class="legend">{escape(legend)}</p>{totals}'
        f'<div class="cards" id="workers">{cards}</div></section>'
    )


def _total(label: str, value_html: str) -> str:
    return (
        f'<div class="card"><div class="label">{escape(label)}</div>'
        f'<div class="value">{value_html}</div></div>'
    )


def _worker_card(worker: WorkerCard) -> str:
    badges = []
    if worker.own:
        badges.append('<span class="badge ok">this worker</span>')
    if worker.shedding:
        badges.append('<span class="badge bad">shedding</span>')
    if worker.draining:
        badges.append('<span class="badge warn">draining</span>')
    cooling = ", ".join(worker.cooling) or "none"
    pid = "?" if worker.pid is None else str(worker.pid)
    return (
        f'<div class="card worker" data-worker="{escape(worker.worker_id, quote=True)}"'
        f' data-own="{"true" if worker.own else "false"}">'
        f'<div class="label">{escape(worker.host)} · pid {pid}</div>'
        f'<div class="value">{worker.in_flight} in flight {" ".join(badges)}</div>'
        f'<div class="muted">cooling: {escape(cooling)}<br>'
        f"config <code>{escape(worker.config_digest[:12])}</code> · v{escape(worker.version)}"
        f"<br>since {worker.started_at:%H:%M:%S} UTC</div></div>"
    )
