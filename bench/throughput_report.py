"""Medians, ratios, the printed table and the PNG plot of `gateway bench throughput`."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

P99_LIMIT_MS = 50.0
ORDER = ("direct", "bare", "gateway", "litellm")


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 3) if present else None


def _mode(streaming: bool) -> str:
    return "streaming" if streaming else "non_streaming"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode and target: medians over repetitions of the closed loop at each concurrency, and
    the open loop's capacity (highest rate with p99 <= 50 ms), p99 per rate and first failure."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_mode(row["streaming"]), row["target"]].append(row)
    summary: dict[str, Any] = {}
    for (mode, target), group in groups.items():
        closed: dict[str, Any] = {}
        by_concurrency: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in group:
            if row["kind"] == "closed":
                by_concurrency[row["concurrency"]].append(row)
        for concurrency, runs in sorted(by_concurrency.items()):
            closed[str(concurrency)] = {
                field: _median([run[field] for run in runs])
                for field in ("requests_per_second", "cpu_us_per_request", "p50_ms", "p99_ms")
            } | {
                "requests_per_cpu_second": _median(
                    [1e6 / run["cpu_us_per_request"] for run in runs if run["cpu_us_per_request"]]
                ),
                "target_busy": _median([run["target_busy"] for run in runs]),
                "runs": len(runs),
                "errors": sum(run["errors"] for run in runs),
            }
        summary.setdefault(mode, {})[target] = {
            "closed": closed,
            "steady": _steady(group),
            "open": _open(group),
        }
    for targets in summary.values():
        targets["ratios"] = _ratios(targets)
    return summary


def _steady(group: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [row for row in group if row["kind"] == "steady"]
    if not runs:
        return {}
    return {
        "concurrency": runs[0]["concurrency"],
        "p99_ms": _median([run["steady_p99_ms"] for run in runs]),
        "requests_per_second": _median([run["requests_per_second"] for run in runs]),
        "runs": len(runs),
    }


def _open(group: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [row for row in group if row["kind"] == "open"]
    if not steps:
        return {}
    capacities: list[float] = []
    first_failures = []
    p99_by_rate: dict[float, list[float | None]] = defaultdict(list)
    for repetition in sorted({row["repetition"] for row in steps}):
        runs = [row for row in steps if row["repetition"] == repetition]
        for row in runs:
            p99_by_rate[row["rate"]].append(row["p99_ms"])
        passed = max((row["rate"] for row in runs if not _failed(row)), default=0.0)
        above = [row for row in runs if _failed(row) and row["rate"] > passed]
        capacities.append(passed)
        if above:
            row = min(above, key=lambda row: row["rate"])
            first_failures.append(
                {key: row[key] for key in ("repetition", "rate", "achieved_rate", "p50_ms")}
                | {
                    "p99_ms": row["p99_ms"],
                    "errors": row["errors"],
                    "unfinished": row["unfinished"],
                }
            )
    return {
        "capacity_per_repetition": capacities,
        "capacity": _median(capacities),
        "first_failures": first_failures,
        "p99_ms_by_rate": {
            str(rate): _median(values) for rate, values in sorted(p99_by_rate.items())
        },
        "cpu_us_per_request": _median([row["cpu_us_per_request"] for row in steps]),
    }


def _failed(row: dict[str, Any]) -> bool:
    p99 = row.get("p99_ms")
    errors = row["errors"] + row.get("unfinished", 0)
    return p99 is None or p99 > P99_LIMIT_MS or errors > 0.01 * max(1, row["sent"])


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 3) if top is not None and bottom else None


def _ratios(targets: dict[str, Any]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    pairs = (("gateway", "bare"), ("bare", "direct"), ("gateway", "litellm"))
    for top, bottom in pairs:
        if top not in targets or bottom not in targets:
            continue
        upper, lower = targets[top], targets[bottom]
        entry: dict[str, Any] = {}
        for concurrency, row in upper["closed"].items():
            other = lower["closed"].get(concurrency)
            if other is None:
                continue
            entry[f"requests_per_second_c{concurrency}"] = _ratio(
                row["requests_per_second"], other["requests_per_second"]
            )
            entry[f"cpu_per_request_c{concurrency}"] = _ratio(
                row["cpu_us_per_request"], other["cpu_us_per_request"]
            )
            entry[f"p99_c{concurrency}"] = _ratio(row["p99_ms"], other["p99_ms"])
        if upper["steady"] and lower["steady"]:
            entry[f"steady_p99_c{upper['steady']['concurrency']}"] = _ratio(
                upper["steady"]["p99_ms"], lower["steady"]["p99_ms"]
            )
        if upper["open"] and lower["open"]:
            entry["open_loop_capacity"] = _ratio(
                upper["open"]["capacity"], lower["open"]["capacity"]
            )
        ratios[f"{top}_over_{bottom}"] = entry
    return ratios


def print_report(document: dict[str, Any]) -> None:
    """A table per mode (medians over repetitions), then the ratios."""
    for mode, targets in document["summary"].items():
        names = [name for name in ORDER if name in targets]
        concurrencies = sorted({int(c) for name in names for c in targets[name]["closed"]}, key=int)
        print(f"\n{mode.replace('_', '-')}: medians of {document['plan']['repetitions']} runs")
        header = "".join(f"{'req/s c=' + str(c):>14}" for c in concurrencies)
        header += "".join(f"{'cpu/req c=' + str(c):>15}" for c in concurrencies)
        print(f"{'target':<9}{header}{'p99 ms c=max':>14}{'steady p99':>12}{'open p99<50':>13}")
        for name in names:
            closed, opened = targets[name]["closed"], targets[name]["open"]
            cells = "".join(
                f"{_show(closed.get(str(c), {}).get('requests_per_second')):>14}"
                for c in concurrencies
            )
            cells += "".join(
                f"{_show(closed.get(str(c), {}).get('cpu_us_per_request'), ' us'):>15}"
                for c in concurrencies
            )
            top = closed.get(str(concurrencies[-1]), {}) if concurrencies else {}
            capacity = opened.get("capacity") if opened else None
            steady = targets[name]["steady"].get("p99_ms")
            print(
                f"{name:<9}{cells}{_show(top.get('p99_ms')):>14}{_show(steady):>12}"
                f"{_show(capacity, '/s'):>13}"
            )
        for pair, entry in targets["ratios"].items():
            shown = ", ".join(f"{key} {value}" for key, value in entry.items() if value is not None)
            print(f"  {pair.replace('_', ' ')}: {shown}")


def _show(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:,.2f}{unit}"


def plot(document: dict[str, Any], path: Path) -> Path | None:
    """Open-loop p99 against offered rate, per target and mode, as a PNG; None without
    matplotlib (the optional `bench` extra)."""
    try:
        import matplotlib as mpl  # noqa: PLC0415 - optional extra

        mpl.use("Agg")
        from matplotlib import pyplot, ticker  # noqa: PLC0415
    except ImportError:
        return None
    modes = [
        mode
        for mode, targets in document["summary"].items()
        if any(isinstance(row, dict) and row.get("open") for row in targets.values())
    ]
    if not modes:
        return None
    figure, axes = pyplot.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.6), squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        targets = document["summary"][mode]
        for name in (name for name in ORDER if name in targets and targets[name]["open"]):
            points = [
                (float(rate), p99)
                for rate, p99 in targets[name]["open"]["p99_ms_by_rate"].items()
                if p99 is not None
            ]
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
        axis.axhline(P99_LIMIT_MS, color="grey", linestyle="--", linewidth=1, label="50 ms")
        axis.set_xscale("log")
        axis.set_yscale("log")
        for scale in (axis.xaxis, axis.yaxis):
            scale.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.4g}"))
        axis.set_xlabel("offered rate (requests/s, open loop)")
        axis.set_ylabel("p99 latency from intended send (ms)")
        axis.set_title(f"{mode.replace('_', '-')}, one core per target")
        axis.grid(visible=True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path
