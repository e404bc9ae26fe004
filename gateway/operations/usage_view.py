"""Usage read back for operators: `/admin/usage` (JSON rows, the CLI's filters) and the status
page's section (a per-key table of the last hour and an inline SVG chart, no JavaScript).

Every read is bounded by a short timeout; when the store does not answer, the endpoint says so
with a 503 and the page renders without the figures.
"""

# The store contract takes a per-call `timeout`, enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import escape

import orjson
from aiohttp import web

from affinity_store.store import StoreError
from affinity_store.usage import MinuteUsage, Tokens, UsageStore
from gateway.operations.usage_report import grouped, parse_groups, parse_span
from gateway.shared.errors import GatewayError

ADMIN_USAGE_TIMEOUT_SECONDS = 2.0
DEFAULT_SINCE = "24h"
DEFAULT_BY = "key,model"
# The page lists the keys with the most tokens; the rest are summed into one line.
MAX_KEYS_SHOWN = 50
CHART_MINUTES = 60
CHART_WIDTH, CHART_HEIGHT = 600, 140


async def admin_usage(request: web.Request, store: UsageStore | None) -> web.Response:
    """`/admin/usage?since=24h&by=key,model`: the rollups summed per group, as a JSON list."""
    if store is None:
        raise GatewayError(404, "Usage accounting is off (`usage.enabled: false`).", "not_found")
    try:
        span = parse_span(request.query.get("since", DEFAULT_SINCE))
    except ValueError as error:
        raise GatewayError(400, str(error), "invalid_value", param="since") from None
    try:
        by = parse_groups(request.query.get("by", DEFAULT_BY))
    except ValueError as error:
        raise GatewayError(400, str(error), "invalid_value", param="by") from None
    try:
        totals = await store.usage_totals(
            datetime.now(UTC) - span, timeout=ADMIN_USAGE_TIMEOUT_SECONDS, by=by
        )
    except StoreError:
        raise GatewayError(
            503, "The usage store is unavailable.", "store_unavailable", retry_after=1
        ) from None
    return web.json_response(grouped(totals, by), dumps=_json)


def _json(value: object) -> str:
    """orjson's encoding: the list of a long span over many keys is large."""
    return orjson.dumps(value).decode()


@dataclass(frozen=True)
class KeyUsage:
    """One key's last hour (by configured key id, never the key)."""

    key_id: str
    tokens: Tokens


@dataclass(frozen=True)
class UsageSection:
    """The status page's usage figures; `available` is False when the store did not answer."""

    available: bool
    keys: Sequence[KeyUsage] = ()
    other_keys: int = 0  # keys past MAX_KEYS_SHOWN, summed in `others`
    others: Tokens = field(default_factory=Tokens)
    minutes: Sequence[MinuteUsage] = ()
    since: datetime | None = None


async def collect_usage(store: UsageStore, *, timeout: float) -> UsageSection:
    """The last hour per key and per minute, both reads within `timeout` together."""
    since = _minute(datetime.now(UTC)) - timedelta(minutes=CHART_MINUTES - 1)
    try:
        async with asyncio.timeout(timeout):
            totals, minutes = await asyncio.gather(
                store.usage_totals(since, timeout=timeout, by=("key",)),
                store.usage_by_minute(since, timeout=timeout),
            )
    except (StoreError, TimeoutError):
        return UsageSection(available=False)
    per_key: dict[str, Tokens] = {}
    for usage_key, tokens in totals.items():
        per_key[usage_key.api_key_id] = per_key.get(usage_key.api_key_id, Tokens()) + tokens
    ranked = sorted(
        per_key.items(), key=lambda item: -item[1].prompt_tokens - item[1].completion_tokens
    )
    others = Tokens()
    for _, tokens in ranked[MAX_KEYS_SHOWN:]:
        others += tokens
    return UsageSection(
        available=True,
        keys=[KeyUsage(key_id, tokens) for key_id, tokens in ranked[:MAX_KEYS_SHOWN]],
        other_keys=max(len(ranked) - MAX_KEYS_SHOWN, 0),
        others=others,
        minutes=minutes,
        since=since,
    )


def render_usage(section: UsageSection | None) -> str:
    """The section's HTML: nothing when accounting is off, a notice when the store is down."""
    if section is None:
        return ""
    if not section.available:
        body = (
            '<p class="legend"><span class="badge bad">store down</span> the usage rollups '
            "could not be read in time; requests are still counted and flushed later.</p>"
        )
        return f'<section id="usage"><h2>Usage, last hour</h2>{body}</section>'
    rows = [_key_row(row.key_id, row.tokens) for row in section.keys]
    if section.other_keys:
        rows.append(_key_row(f"{section.other_keys} other key(s)", section.others, code=False))
    headings = "".join(
        f'<th class="number">{title}</th>' if number else f"<th>{title}</th>"
        for title, number in (
            ("Key", False),
            ("Requests", True),
            ("Prompt tokens", True),
            ("Completion tokens", True),
            ("Cached share", True),
        )
    )
    body = (
        "".join(rows) or '<tr><td class="empty" colspan="5">No requests in the last hour.</td></tr>'
    )
    legend = (
        "All workers of the cluster, from the store's per-minute rollups (each worker flushes "
        "every few seconds). Cached share: prompt tokens the nodes served from their cache."
    )
    return (
        '<section id="usage"><h2>Usage, last hour</h2>'
        f'<p class="legend">{escape(legend)}</p>'
        f"{_chart(section)}"
        f'<table id="usage-keys"><thead><tr>{headings}</tr></thead><tbody>{body}</tbody></table>'
        "</section>"
    )


def _key_row(label: str, tokens: Tokens, *, code: bool = True) -> str:
    name = (
        f"<code>{escape(label)}</code>" if code else f'<span class="muted">{escape(label)}</span>'
    )
    share = _share(tokens)
    return (
        f'<tr data-usage-key="{escape(label, quote=True)}"><td>{name}</td>'
        f'<td class="number">{tokens.requests}</td>'
        f'<td class="number">{tokens.prompt_tokens}</td>'
        f'<td class="number">{tokens.completion_tokens}</td>'
        f'<td class="number">{"—" if share is None else f"{share:.1%}"}</td></tr>'
    )


def _share(tokens: Tokens) -> float | None:
    return tokens.cached_tokens / tokens.prompt_tokens if tokens.prompt_tokens else None


def _chart(section: UsageSection) -> str:
    """Requests per minute as bars, cached share as a line (0-100 %), over the last hour."""
    assert section.since is not None
    by_minute = {usage.minute: usage.tokens for usage in section.minutes}
    slots = [
        by_minute.get(section.since + timedelta(minutes=index), Tokens())
        for index in range(CHART_MINUTES)
    ]
    peak = max((tokens.requests for tokens in slots), default=0) or 1
    step = CHART_WIDTH / CHART_MINUTES
    bars, points = [], []
    for index, tokens in enumerate(slots):
        if tokens.requests:
            height = CHART_HEIGHT * tokens.requests / peak
            bars.append(
                f'<rect x="{index * step:.1f}" y="{CHART_HEIGHT - height:.1f}" '
                f'width="{step - 1:.1f}" height="{height:.1f}" fill="#9bb7e0">'
                f"<title>{tokens.requests} requests</title></rect>"
            )
        share = _share(tokens)
        if share is not None:
            x = index * step + step / 2
            points.append(f"{x:.1f},{CHART_HEIGHT * (1 - share):.1f}")
    line = (
        f'<polyline points="{" ".join(points)}" fill="none" stroke="#1a7f37" stroke-width="2"/>'
        if points
        else ""
    )
    return (
        f'<svg id="usage-chart" role="img" width="{CHART_WIDTH}" height="{CHART_HEIGHT + 16}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT + 16}" '
        'aria-label="Requests per minute and cached share, last hour">'
        f'<line x1="0" y1="{CHART_HEIGHT}" x2="{CHART_WIDTH}" y2="{CHART_HEIGHT}" '
        'stroke="#e2e6ec"/>'
        f"{''.join(bars)}{line}"
        f'<text x="0" y="{CHART_HEIGHT + 13}" font-size="11" fill="#5f6b7a">'
        f"bars: requests per minute (peak {peak}) · line: cached share, 0 to 100 % · 60 min</text>"
        "</svg>"
    )


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)
