"""The HTML of `/admin/status` (placeholder; the full page is being written)."""

from __future__ import annotations

from html import escape

from gateway.status import StatusSnapshot


def render_status(snapshot: StatusSnapshot) -> str:
    """A small server-rendered page of the snapshot."""
    rows = "".join(
        f"<tr><td>{escape(row.name)}</td><td>{row.in_flight}</td></tr>"
        for row in snapshot.providers
    )
    return f"<!doctype html><html><body><table id='providers'>{rows}</table></body></html>"
