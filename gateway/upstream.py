"""The upstream side: one client session per worker, header hygiene, and what one attempt sends."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.catalog import Provider
from gateway.config import RoutingSettings

# RFC 9110 §7.6.1 hop-by-hop headers, plus the ones the gateway owns or recomputes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | {
    "host",
    "authorization",
    "content-length",
    "accept-encoding",  # the gateway asks for identity bodies so streams pass through unchanged
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
}
NOT_FORWARDED_DOWNSTREAM = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "date",
    "server",
    "set-cookie",
}


def create_client_session(routing: RoutingSettings) -> aiohttp.ClientSession:
    """The worker's one client session: pooled keep-alive connections and config timeouts."""
    connector = aiohttp.TCPConnector(
        limit=0,  # per-provider permits bound concurrency; the pool must not queue behind them
        limit_per_host=0,
        keepalive_timeout=30,
        ttl_dns_cache=60,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=routing.connect_timeout_seconds,
        sock_read=routing.first_byte_timeout_seconds,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
    )


def upstream_headers(
    incoming: Mapping[str, str], provider: Provider, request_id: str, drop: frozenset[str]
) -> CIMultiDict[str]:
    """Headers for the upstream request: the client's, minus hop-by-hop and its credential."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lowered = name.lower()
        if lowered in NOT_FORWARDED_UPSTREAM or lowered in drop or lowered.startswith("x-gateway-"):
            continue
        headers.add(name, value)
    headers["x-request-id"] = request_id
    headers["Accept-Encoding"] = "identity"
    if provider.credential:
        headers["Authorization"] = f"Bearer {provider.credential}"
    return headers


def downstream_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers of the upstream response that may reach the client."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in NOT_FORWARDED_DOWNSTREAM:
            headers.add(name, value)
    return headers
