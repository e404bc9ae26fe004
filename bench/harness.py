"""What the benchmarks share: provider lists, percentiles and the results file (the processes
they run come from `bench.launcher`)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def providers(urls: Mapping[str, str], model: str) -> list[dict[str, Any]]:
    """A config `providers` list: one provider per node URL, serving `model` under its own name."""
    return [{"name": name, "url": url, "models": {model: model}} for name, url in urls.items()]


def summary(latencies_ms: list[float]) -> dict[str, float]:
    """Count, failures (NaN entries), median and p99 of the rest."""
    ok = sorted(value for value in latencies_ms if not math.isnan(value))
    return {
        "requests": len(latencies_ms),
        "failed": len(latencies_ms) - len(ok),
        "median_ms": statistics.median(ok) if ok else math.nan,
        "p99_ms": ok[min(len(ok) - 1, int(len(ok) * 0.99))] if ok else math.nan,
    }


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Write a benchmark's JSON next to the others, with the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **payload,
    }
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path
