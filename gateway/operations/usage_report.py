"""Usage rollups read back: grouped by the fields asked for, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from affinity_store.usage import GROUPS, Tokens, UsageKey

COUNTS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens")
_SPAN = re.compile(r"^(?P<amount>[1-9][0-9]{0,5})(?P<unit>[mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_span(text: str) -> timedelta:
    """`90m`, `24h` or `7d` as a duration; ValueError for anything else."""
    match = _SPAN.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a span like 90m, 24h or 7d")
    return timedelta(**{_UNITS[match["unit"]]: int(match["amount"])})


def parse_groups(text: str) -> tuple[str, ...]:
    """`key,model` as grouping fields, in the order given; ValueError for unknown ones."""
    fields = tuple(field.strip() for field in text.split(",") if field.strip())
    unknown = [field for field in fields if field not in GROUPS]
    if unknown or not fields:
        raise ValueError(f"group by some of {', '.join(GROUPS)} (got {text!r})")
    return tuple(dict.fromkeys(fields))


def grouped(totals: Mapping[UsageKey, Tokens], by: Sequence[str]) -> list[dict[str, Any]]:
    """One row per distinct value of the `by` fields, with the counts summed, largest first."""
    sums: dict[tuple[str, ...], Tokens] = {}
    for usage_key, tokens in totals.items():
        values = {
            "key": usage_key.api_key_id,
            "model": usage_key.model,
            "provider": usage_key.provider,
            "outcome": usage_key.outcome,
        }
        group = tuple(values[field] for field in by)
        sums[group] = sums.get(group, Tokens()) + tokens
    return [
        {
            **dict(zip(by, group, strict=True)),
            "requests": tokens.requests,
            "prompt_tokens": tokens.prompt_tokens,
            "completion_tokens": tokens.completion_tokens,
            "cached_tokens": tokens.cached_tokens,
        }
        for group, tokens in sorted(
            sums.items(),
            key=lambda item: (-item[1].prompt_tokens - item[1].completion_tokens, item[0]),
        )
    ]


def cached_share(row: Mapping[str, Any]) -> float | None:
    """The share of the prompt tokens the nodes served from cache; None without prompt tokens."""
    prompt = row["prompt_tokens"]
    return row["cached_tokens"] / prompt if prompt else None


def render(rows: Sequence[Mapping[str, Any]], by: Sequence[str], output: str) -> str:
    """The rows as `table`, `csv` or `json`."""
    if output == "json":
        return json.dumps(list(rows), indent=2)
    columns = [*by, *COUNTS]
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    header = [
        *(field.upper() for field in by),
        "REQUESTS",
        "PROMPT",
        "COMPLETION",
        "CACHED",
        "CACHED %",
    ]
    lines = [header]
    for row in rows:
        share = cached_share(row)
        lines.append(
            [
                *(str(row[field]) for field in by),
                *(str(row[count]) for count in COUNTS),
                "-" if share is None else f"{share:.1%}",
            ]
        )
    widths = [max(len(line[index]) for line in lines) for index in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
