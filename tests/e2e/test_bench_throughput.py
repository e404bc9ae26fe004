"""`gateway bench throughput` runs end to end in a few seconds: a smoke run, no speed thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def bench(output: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the benchmark as the README shows, into `output`; its process and its JSON."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "bench",
            "throughput",
            "--output-dir",
            str(output),
            "--cache-dir",
            str(output / "cache"),
            *flags,
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    document = json.loads((output / "throughput.json").read_text(encoding="utf-8"))
    return completed, document


def test_quick_run_measures_each_target_and_writes_json_and_plot(tmp_path: Path) -> None:
    """--quick drives direct, bare and gateway closed loop, steady and open loop, all answered,
    and writes the JSON, the PNG and the gateway/bare ratios."""
    completed, document = bench(tmp_path, "--quick")
    assert document["targets_run"] == ["direct", "bare", "gateway"]
    runs = document["runs"]
    for target in ("direct", "bare", "gateway"):
        kinds = {row["kind"] for row in runs if row["target"] == target}
        assert kinds == {"closed", "steady", "open"}, target
    for row in runs:
        assert row["ok"] > 0, row
        assert row["errors"] == 0, row
        assert row["cpu_us_per_request"] is not None, row
    assert all(row.get("unfinished", 0) == 0 for row in runs)
    ratios = document["summary"]["non_streaming"]["ratios"]["gateway_over_bare"]
    assert ratios["requests_per_second_c8"] is not None
    assert ratios["steady_p99_c32"] is not None
    steady = [row for row in runs if row["kind"] == "steady"]
    assert all(row["concurrency"] == 32 and row["p99_per_second_ms"] for row in steady)
    assert "gateway over bare" in completed.stdout
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_streamed_run_with_the_bench_generator_instead_of_wrk(tmp_path: Path) -> None:
    """--no-wrk drives the closed loop with the bench's own generator (what runs where wrk is
    not installed), here with streamed answers through the bare proxy and the gateway."""
    _, document = bench(
        tmp_path,
        "--no-wrk", "--targets", "bare,gateway", "--streaming", "on", "--duration", "1",
        "--concurrency", "8", "--rates", "100", "--repetitions", "1",
    )  # fmt: skip
    assert document["plan"]["closed_loop_generator"] == "python"
    runs = document["runs"]
    assert {(row["target"], row["kind"]) for row in runs} == {
        ("bare", "closed"), ("bare", "steady"), ("bare", "open"),
        ("gateway", "closed"), ("gateway", "steady"), ("gateway", "open"),
    }  # fmt: skip
    for row in runs:
        assert row["streaming"] is True
        assert row["ok"] > 0, row
        assert row["errors"] == 0, row
