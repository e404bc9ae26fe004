"""The `/admin/status` HTML: escaping, every provider and decision shown, store-down rendering."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from html.parser import HTMLParser
from typing import Any

from gateway.operations.status import (
    KeyShareRow,
    OverloadRow,
    ProviderRow,
    StatusSnapshot,
)
from gateway.operations.status_page import render_status
from gateway.shared.decisions import RecentDecision

HOSTILE = "<script>alert('x')</script>&\""


def provider(name: str, **changes: Any) -> ProviderRow:
    """A healthy provider row with a band for one model, changed by `changes`."""
    row = ProviderRow(
        name=name,
        routing_identity=f"{name}-identity",
        cooling_seconds=0.0,
        in_flight=2,
        load=7.0,
        load_polled=True,
        bands={"llama": 0},
        live_bindings=4,
    )
    return replace(row, **changes)


def decision(request_id: str, **changes: Any) -> RecentDecision:
    """A successful decision on gpu-a, changed by `changes`."""
    row = RecentDecision(
        at=1_750_000_000.0,
        request_id=request_id,
        key_id="team-a",
        model="llama",
        provider="gpu-a",
        affinity="hit",
        attempts=("gpu-a:ok",),
        status=200,
        duration_ms=12.5,
    )
    return replace(row, **changes)


def snapshot(
    providers: Sequence[ProviderRow],
    decisions: Sequence[RecentDecision] = (),
    *,
    circuit: str = "closed",
    refresh_seconds: int = 5,
) -> StatusSnapshot:
    """A snapshot of the given rows."""
    return StatusSnapshot(
        worker_pid=4242,
        generated_at=1_750_000_000.0,
        store_circuit=circuit,
        providers=providers,
        decisions=decisions,
        refresh_seconds=refresh_seconds,
    )


class TableReader(HTMLParser):
    """Collects the text of each row of one table (by id) and every start tag seen."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id = table_id
        self.depth = 0
        self.rows: list[list[str]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Track entering the table, its rows and cells."""
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table" and attributes.get("id") == self.table_id:
            self.depth = 1
        elif self.depth and tag == "table":
            self.depth += 1
        elif self.depth and tag == "tr":
            self.rows.append([])
        elif self.depth and tag == "td" and self.rows:
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        """Track leaving the table."""
        if self.depth and tag == "table":
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        """Append text to the current cell."""
        if self.depth and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def table_rows(page: str, table_id: str) -> list[list[str]]:
    """The cell texts of the body rows of table `table_id` (header rows have no cells)."""
    reader = TableReader(table_id)
    reader.feed(page)
    return [[cell.strip() for cell in row] for row in reader.rows if row]


def test_every_provider_has_a_row_with_its_state() -> None:
    """Each provider appears once in #providers with identity, health, load, bands and bindings."""
    rows = [
        provider("gpu-a"),
        provider(
            "gpu-b",
            load=3.5,
            load_polled=False,
            bands={"llama": 2, "qwen": -1},
            latency_source="node",
            latency_age_seconds=0.42,
        ),
        provider("hosted-1", cooling_seconds=12.3, live_bindings=0),
        provider("gpu-c", cooldown_withheld=True),
    ]
    cells = table_rows(render_status(snapshot(rows)), "providers")
    assert [row[0] for row in cells] == ["gpu-a", "gpu-b", "hosted-1", "gpu-c"]
    gpu_a, gpu_b, hosted, withheld = cells
    assert gpu_a[1:] == [
        "gpu-a-identity",
        "ok",
        "2",
        "7 (polled)",
        "llama band 0 (no fresh figure)",
        "4",
    ]
    assert gpu_b[4] == "3.5 (in-flight, not polled)"
    assert gpu_b[5] == "llama band +2qwen band -1 (node metrics, 0.4 s old)"
    assert hosted[2] == "cooling, 12.3 s left"
    assert hosted[6] == "0"
    assert withheld[2] == "failing, cooldown withheld"


def test_each_provider_shows_where_its_latency_comes_from_and_its_age() -> None:
    """The band cell names its source (node metrics or this worker's samples) and its age."""
    rows = [
        provider("gpu-a", latency_source="node", latency_age_seconds=1.25),
        provider("hosted-1", latency_source="own", latency_age_seconds=30.0),
        provider("gpu-b"),
    ]
    cells = table_rows(render_status(snapshot(rows)), "providers")
    assert [row[5] for row in cells] == [
        "llama band 0 (node metrics, 1.2 s old)",
        "llama band 0 (this worker's samples, 30.0 s old)",
        "llama band 0 (no fresh figure)",
    ]


def test_store_down_shows_in_bindings_and_circuit() -> None:
    """With no binding counts and an open circuit, rows say "store down" and the circuit is open."""
    page = render_status(
        snapshot([provider("gpu-a", live_bindings=None)], circuit="open"),
    )
    (row,) = table_rows(page, "providers")
    assert row[6] == "store down"
    assert re.search(r'id="store-circuit" class="badge bad">open: routing on local state<', page)


def test_half_open_circuit_is_shown_as_probing() -> None:
    """A half-open circuit is labelled as probing the store."""
    page = render_status(snapshot([provider("gpu-a")], circuit="half_open"))
    assert "half-open: probing the store" in page


def test_decisions_are_listed_with_ids_and_outcome() -> None:
    """Each recent decision is a row: time, request id, key id, model, provider, affinity, ..."""
    decisions = [
        decision("req-2", status=503, provider=None, attempts=("gpu-a:timeout", "gpu-b:http_500")),
        decision("req-1"),
    ]
    cells = table_rows(render_status(snapshot([provider("gpu-a")], decisions)), "decisions")
    assert cells == [
        [
            "15:06:40",
            "req-2",
            "team-a",
            "llama",
            "—",
            "hit",
            "gpu-a:timeout, gpu-b:http_500",
            "503",
            "12.5 ms",
        ],
        ["15:06:40", "req-1", "team-a", "llama", "gpu-a", "hit", "gpu-a:ok", "200", "12.5 ms"],
    ]


def test_every_value_is_escaped() -> None:
    """Markup in names, ids, models and outcomes is shown as text, never parsed as HTML."""
    page = render_status(
        snapshot(
            [provider(HOSTILE, routing_identity=HOSTILE, bands={HOSTILE: 1})],
            [
                decision(
                    HOSTILE,
                    key_id=HOSTILE,
                    model=HOSTILE,
                    provider=HOSTILE,
                    affinity=HOSTILE,
                    attempts=(HOSTILE,),
                )
            ],
            circuit=HOSTILE,
        )
    )
    assert "<script>" not in page
    reader = TableReader("providers")
    reader.feed(page)
    assert "script" not in {tag for tag, _ in reader.tags}
    # name, its row attribute, identity, band model, circuit, and six decision fields
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;") == 11
    (row,) = table_rows(page, "providers")
    assert row[0] == HOSTILE
    assert ("tr", {"data-provider": HOSTILE}) in reader.tags


def test_page_refreshes_itself_and_needs_no_external_assets() -> None:
    """A meta refresh with the snapshot's period; no scripts, links or remote URLs."""
    page = render_status(snapshot([provider("gpu-a")], refresh_seconds=7))
    assert '<meta http-equiv="refresh" content="7">' in page
    reader = TableReader("providers")
    reader.feed(page)
    tags = {tag for tag, _ in reader.tags}
    assert not tags & {"script", "link", "img", "iframe"}
    assert "http://" not in page.replace("http-equiv", "")
    assert "https://" not in page


def test_empty_tables_say_so() -> None:
    """With no decisions yet the decisions table shows one explanatory row."""
    cells = table_rows(render_status(snapshot([provider("gpu-a")])), "decisions")
    assert cells == [["No requests yet on this worker."]]


def test_each_limited_key_shows_this_workers_share() -> None:
    """#key-limits lists each key's cluster-wide limits with this worker's share, by key id."""
    page = render_status(
        replace(
            snapshot([provider("gpu-a")]),
            key_shares=[
                KeyShareRow("team-a", "max_concurrency", 2, 1, 1),
                KeyShareRow("team-a", "requests_per_minute", 600, 150, 1),
            ],
            cluster_workers=4,
        )
    )
    assert table_rows(page, "key-limits") == [
        ["team-a", "max_concurrency", "2", "1", "1"],
        ["team-a", "requests_per_minute", "600", "150", "—"],
    ]
    assert "shared among the 4 live worker(s)" in page


def test_the_load_card_says_whether_the_worker_sheds_and_why() -> None:
    """Overloaded, the card says it sheds requests that queued past the shedding level, with
    the queueing delay, the burst allowance and the counts; a worker keeping up says so; with
    shedding off an overload is still shown, as not shed."""
    overload = OverloadRow(
        enabled=True,
        overloaded=True,
        delay_ms=1275.5,
        burst_ms=1000.0,
        level_ms=250.0,
        shed=1234,
        episodes=2,
    )
    shedding = render_status(replace(snapshot([provider("gpu-a")]), overload=overload))
    assert "overloaded: shedding requests that waited over 250 ms" in shedding
    assert "queueing delay 1275.5 ms (burst allowance 1000 ms)" in shedding
    assert "1234 shed in 2 episode(s)" in shedding
    calm = replace(overload, overloaded=False, delay_ms=0.4)
    keeping_up = render_status(replace(snapshot([provider("gpu-a")]), overload=calm))
    assert "keeping up" in keeping_up
    assert "overloaded" not in keeping_up
    off = replace(overload, enabled=False)
    assert "overloaded (shedding off)" in render_status(
        replace(snapshot([provider("gpu-a")]), overload=off)
    )
