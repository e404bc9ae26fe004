"""The HTML of `/admin/status`: one self-contained, auto-refreshing page of a `StatusSnapshot`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from html import escape

from gateway.operations.cluster_view import render_cluster
from gateway.operations.status import (
    MemoryRow,
    OverloadRow,
    ProviderRow,
    StatusSnapshot,
)
from gateway.operations.usage_view import render_usage
from gateway.shared.decisions import RecentDecision

# Inline on purpose: the page must work with no asset routes, no build step and no network.
STYLE = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5f6b7a; --line: #e2e6ec;
  --panel: #ffffff; --page: #f4f6f9; --ok: #1a7f37; --ok-bg: #e6f4ea; --warn: #9a6700;
  --warn-bg: #fff4d6; --bad: #b42318; --bad-bg: #fde8e6; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px; background: var(--page); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 18px; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 15px; margin: 0 0 10px; }
.meta { color: var(--muted); }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 18px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 16px; min-width: 150px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .value { font-size: 18px; font-weight: 600; margin-top: 2px; }
section { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px; margin-bottom: 18px; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
  vertical-align: top; white-space: nowrap; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
tbody tr:last-child td { border-bottom: none; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th.number { text-align: right; }
code { font: 12.5px ui-monospace, "DejaVu Sans Mono", monospace; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600; }
.ok { color: var(--ok); background: var(--ok-bg); }
.warn { color: var(--warn); background: var(--warn-bg); }
.bad { color: var(--bad); background: var(--bad-bg); }
.muted { color: var(--muted); }
.band { display: inline-block; margin: 0 6px 2px 0; }
.empty { color: var(--muted); padding: 8px 10px; }
.legend { color: var(--muted); font-size: 12.5px; margin: -4px 0 10px; }
"""

CIRCUIT_BADGES: Mapping[str, tuple[str, str]] = {
    "closed": ("ok", "closed: store answering"),
    "half_open": ("warn", "half-open: probing the store"),
    "open": ("bad", "open: routing on local state"),
}

PROVIDER_HEADINGS = (
    ("Provider", ""),
    ("Routing identity", ""),
    ("Health", ""),
    ("In flight", "number"),
    ("Load", "number"),
    ("Latency band per model", ""),
    ("Live bindings", "number"),
)

KEY_LIMIT_HEADINGS = (
    ("Key", ""),
    ("Limit", ""),
    ("Cluster-wide", "number"),
    ("This worker's share", "number"),
    ("In flight here", "number"),
)

PROVIDER_LEGEND = (
    "Load: running + waiting requests as last polled from the node, else this worker's "
    "in-flight requests. Latency band: 0 is near the model's mean time to first token; "
    "negative is faster, positive slower; measured by the node's own metrics (the same in "
    "every worker), else by this worker's samples, else none yet (band 0)."
)

DECISION_HEADINGS = (
    ("Time (UTC)", ""),
    ("Request id", ""),
    ("Key id", ""),
    ("Model", ""),
    ("Provider", ""),
    ("Affinity", ""),
    ("Attempts", ""),
    ("Status", "number"),
    ("Duration", "number"),
)


def render_status(snapshot: StatusSnapshot) -> str:
    """The whole page for `snapshot`, every value HTML-escaped, refreshing itself."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snapshot.generated_at))
    refresh = max(int(snapshot.refresh_seconds), 1)
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="refresh" content="{refresh}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="robots" content="noindex">',
            f"<title>affinity-gateway status · worker {snapshot.worker_pid}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            "<header>",
            "<h1>affinity-gateway status</h1>",
            f'<span class="meta">worker pid {snapshot.worker_pid} · generated {generated}'
            f" · refreshes every {refresh} s · cluster and usage: every worker; the rest: "
            "this worker's view</span>",
            "</header>",
            render_cluster(snapshot.cluster),
            _summary_cards(snapshot),
            _providers_section(snapshot),
            _key_limits_section(snapshot),
            render_usage(snapshot.usage),
            _decisions_section(snapshot),
            "</body>",
            "</html>",
        ]
    )


def _summary_cards(snapshot: StatusSnapshot) -> str:
    tone, label = CIRCUIT_BADGES.get(snapshot.store_circuit, ("warn", snapshot.store_circuit))
    cooling = sum(1 for row in snapshot.providers if row.cooling_seconds > 0)
    in_flight = sum(row.in_flight for row in snapshot.providers)
    return (
        '<div class="cards">'
        + _card(
            "Store circuit", f'<span id="store-circuit" class="badge {tone}">{_text(label)}</span>'
        )
        + _card("Providers", f"{len(snapshot.providers)} ({cooling} cooling)")
        + _card("In flight", str(in_flight))
        + _card("Recent requests", str(len(snapshot.decisions)))
        + _card("Load", _overload(snapshot.overload))
        + _card("Memory", _memory(snapshot.memory))
        + _card("Config", _config(snapshot))
        + "</div>"
    )


def _overload(overload: OverloadRow | None) -> str:
    if overload is None:
        return '<span id="overload" class="badge muted">not measured</span>'
    if overload.overloaded and overload.enabled:
        badge = (
            '<span id="overload" class="badge bad">overloaded: shedding requests that waited '
            f"over {_number(overload.level_ms)} ms</span>"
        )
    elif overload.overloaded:
        badge = '<span id="overload" class="badge warn">overloaded (shedding off)</span>'
    else:
        badge = '<span id="overload" class="badge ok">keeping up</span>'
    return (
        f'{badge}<div class="muted">queueing delay {_number(overload.delay_ms)} ms '
        f"(burst allowance {_number(overload.burst_ms)} ms) · {overload.shed} shed "
        f"in {overload.episodes} episode(s)</div>"
    )


def _memory(memory: MemoryRow | None) -> str:
    if memory is None:
        return '<span id="memory" class="badge muted">no budget</span>'
    mib = 1024 * 1024
    used = memory.held_bytes / memory.budget_bytes if memory.budget_bytes else 0.0
    tone = "bad" if used > 0.9 else "warn" if used > 0.5 else "ok"
    uses = ", ".join(
        f"{_text(use.replace('_', ' '))} {_number(round(size / mib, 1))}"
        for use, size in memory.held_by_use.items()
    )
    return (
        f'<span id="memory" class="badge {tone}">{_number(round(memory.held_bytes / mib, 1))} '
        f"of {_number(round(memory.budget_bytes / mib, 1))} MiB held</span>"
        f'<div class="muted">{uses} MiB · one key at most '
        f"{_number(round(memory.key_share_bytes / mib, 1))} MiB · "
        f"{memory.refusals} refusal(s)</div>"
    )


def _config(snapshot: StatusSnapshot) -> str:
    loaded = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snapshot.config_loaded_at))
    restart = (
        '<div><span class="badge warn">restart needed for '
        + _text(", ".join(snapshot.restart_needed))
        + "</span></div>"
        if snapshot.restart_needed
        else ""
    )
    return (
        f'<code id="config-digest" title="{_text(snapshot.config_digest)}">'
        f"{_text(snapshot.config_digest[:12])}</code>"
        f' <span class="muted">loaded {loaded}</span>{restart}'
    )


def _card(label: str, value_html: str) -> str:
    return (
        f'<div class="card"><div class="label">{_text(label)}</div>'
        f'<div class="value">{value_html}</div></div>'
    )


def _providers_section(snapshot: StatusSnapshot) -> str:
    rows = "".join(_provider_row(row) for row in snapshot.providers)
    body = rows or _empty_row(len(PROVIDER_HEADINGS), "No providers configured.")
    return (
        "<section>"
        "<h2>Providers</h2>"
        f'<p class="legend">{_text(PROVIDER_LEGEND)}</p>'
        f'<table id="providers">{_head(PROVIDER_HEADINGS)}<tbody>{body}</tbody></table>'
        "</section>"
    )


def _provider_row(row: ProviderRow) -> str:
    if row.cooling_seconds > 0:
        health = f'<span class="badge bad">cooling, {row.cooling_seconds:.1f} s left</span>'
    elif row.cooldown_withheld:
        health = '<span class="badge warn">failing, cooldown withheld</span>'
    elif row.draining:
        health = '<span class="badge warn">draining</span>'
    else:
        health = '<span class="badge ok">ok</span>'
    load_source = "polled" if row.load_polled else "in-flight, not polled"
    load = f'{_number(row.load)} <span class="muted">({load_source})</span>'
    bindings = (
        '<span class="badge bad">store down</span>'
        if row.live_bindings is None
        else str(row.live_bindings)
    )
    cells = (
        ("", f"<strong>{_text(row.name)}</strong>"),
        ("", f"<code>{_text(row.routing_identity)}</code>"),
        ("", health),
        ("number", str(row.in_flight)),
        ("number", load),
        ("", _bands(row.bands) + _latency_source(row)),
        ("number", bindings),
    )
    return f'<tr data-provider="{_text(row.name)}">{_cells(cells)}</tr>'


def _key_limits_section(snapshot: StatusSnapshot) -> str:
    rows = "".join(
        f'<tr data-key="{_text(row.key_id)}">'
        + _cells(
            (
                ("", f"<code>{_text(row.key_id)}</code>"),
                ("", _text(row.limit_name)),
                ("number", str(row.limit)),
                ("number", str(row.share)),
                ("number", str(row.in_flight) if row.limit_name == "max_concurrency" else "—"),
            )
        )
        + "</tr>"
        for row in snapshot.key_shares
    )
    body = rows or _empty_row(len(KEY_LIMIT_HEADINGS), "No key has a cluster-wide limit.")
    legend = (
        f"Each limit is shared among the {snapshot.cluster_workers} live worker(s); this worker "
        "admits requests against its own share only."
    )
    return (
        "<section>"
        "<h2>Key limits</h2>"
        f'<p class="legend">{_text(legend)}</p>'
        f'<table id="key-limits">{_head(KEY_LIMIT_HEADINGS)}<tbody>{body}</tbody></table>'
        "</section>"
    )


def _bands(bands: Mapping[str, int]) -> str:
    if not bands:
        return '<span class="muted">no models</span>'
    return "".join(
        f'<span class="band"><code>{_text(model)}</code> '
        f'<span class="badge {_band_tone(band)}">{_band_label(band)}</span></span>'
        for model, band in sorted(bands.items())
    )


def _latency_source(row: ProviderRow) -> str:
    sources = {"node": "node metrics", "own": "this worker's samples"}
    source = sources.get(row.latency_source)
    if source is None or row.latency_age_seconds is None:
        return ' <span class="muted latency-source">(no fresh figure)</span>'
    return (
        f' <span class="muted latency-source">({_text(source)}, '
        f"{row.latency_age_seconds:.1f} s old)</span>"
    )


def _band_tone(band: int) -> str:
    if band <= 0:
        return "ok"
    return "warn" if band == 1 else "bad"


def _band_label(band: int) -> str:
    if band == 0:
        return "band 0"
    return f"band {band:+d}"


def _decisions_section(snapshot: StatusSnapshot) -> str:
    rows = "".join(_decision_row(decision) for decision in snapshot.decisions)
    body = rows or _empty_row(len(DECISION_HEADINGS), "No requests yet on this worker.")
    return (
        "<section>"
        "<h2>Last routing decisions <span class='muted'>(newest first; ids only)</span></h2>"
        f'<table id="decisions">{_head(DECISION_HEADINGS)}<tbody>{body}</tbody></table>'
        "</section>"
    )


def _decision_row(decision: RecentDecision) -> str:
    tone = "ok" if decision.status < 400 else ("warn" if decision.status < 500 else "bad")
    attempts = ", ".join(decision.attempts)
    cells = (
        ("", time.strftime("%H:%M:%S", time.gmtime(decision.at))),
        ("", f"<code>{_text(decision.request_id)}</code>"),
        ("", _optional(decision.key_id)),
        ("", _optional(decision.model)),
        ("", _optional(decision.provider)),
        ("", _text(decision.affinity)),
        ("", f"<code>{_text(attempts)}</code>" if attempts else '<span class="muted">—</span>'),
        ("number", f'<span class="badge {tone}">{decision.status}</span>'),
        ("number", f"{decision.duration_ms:.1f} ms"),
    )
    return f"<tr>{_cells(cells)}</tr>"


def _head(headings: Iterable[tuple[str, str]]) -> str:
    cells = "".join(
        f'<th class="{css}">{_text(title)}</th>' if css else f"<th>{_text(title)}</th>"
        for title, css in headings
    )
    return f"<thead><tr>{cells}</tr></thead>"


def _cells(cells: Iterable[tuple[str, str]]) -> str:
    return "".join(
        f'<td class="{css}">{content}</td>' if css else f"<td>{content}</td>"
        for css, content in cells
    )


def _empty_row(columns: int, message: str) -> str:
    return f'<tr><td class="empty" colspan="{columns}">{_text(message)}</td></tr>'


def _optional(value: str | None) -> str:
    return '<span class="muted">—</span>' if value is None else _text(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _text(value: object) -> str:
    return escape(str(value), quote=True)
