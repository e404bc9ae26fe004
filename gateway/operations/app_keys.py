"""The gateway application's keys: what one worker's aiohttp application holds, by name."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from affinity_store.store import AffinityStore
from affinity_store.usage import UsageStore
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.dispatch.cluster_shares import ClusterShares
from gateway.dispatch.load import LoadPoller
from gateway.dispatch.usage_book import UsageBook
from gateway.edge.overload import OverloadGate
from gateway.operations.reload import Reloader
from gateway.operations.runtime import Lifecycle, RuntimeHolder
from gateway.selection.affinity import SharedAffinity
from gateway.shared.metrics import Metrics

SETTINGS = web.AppKey("settings", Settings)
CATALOG = web.AppKey("catalog", Catalog)
METRICS = web.AppKey("metrics", Metrics)
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
RUNTIME = web.AppKey("runtime", RuntimeHolder)
RELOADER = web.AppKey("reloader", Reloader)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
STORE = web.AppKey("store", AffinityStore)
AFFINITY = web.AppKey("affinity", SharedAffinity)
LOAD = web.AppKey("load", LoadPoller)
# Where each request meets the load shedder, before the app (see `gateway.edge.overload`).
OVERLOAD_GATE = web.AppKey("overload_gate", OverloadGate)
SHARES = web.AppKey("shares", ClusterShares)
USAGE_STORE = web.AppKey("usage_store", UsageStore)
USAGE_BOOK = web.AppKey("usage_book", UsageBook)
METRICS_DIRECTORY = web.AppKey("metrics_directory", str)
