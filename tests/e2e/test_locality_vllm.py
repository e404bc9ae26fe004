"""`gateway bench locality --engine vllm` runs end to end against a real vLLM node: a smoke run
of every phase (the one-key phases too) on the session's one node, no thresholds."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pytest

from bench import locality_vllm
from tests.support.vllm import START_TIMEOUT_SECONDS, VllmNode

# The first real-engine test also waits for the session's node to start.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.real_engine,
    pytest.mark.timeout(START_TIMEOUT_SECONDS + 240),
]


async def test_every_phase_runs_and_reads_vllms_own_counters(vllm_node: VllmNode) -> None:
    """Each phase serves every turn, reads vLLM's prefix-cache counters and usage, and keeps each
    user on one node (there is one)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lookup-timeout-ms", type=float, default=500)
    locality_vllm.add_arguments(parser)
    options = parser.parse_args(
        ["--users", "2", "--processes", "2", "--prompt-words", "40", "--node-url", vllm_node.url]
    )
    phases = [*locality_vllm.PHASES, *locality_vllm.ONE_KEY_PHASES]
    options.phases = phases
    # Not under pytest's tmp_path: a pytest starting elsewhere makes its root 0700 again, and the
    # embedded Postgres (its own user) then loses its way into its data directory mid-run.
    with tempfile.TemporaryDirectory(prefix="locality-vllm-") as work:
        document = await locality_vllm.run(options, Path(work))
    assert set(document["results"]) == set(phases)
    for row in document["results"].values():
        assert row["requests"] == 4
        # The second turn repeats the first one's prompt: vLLM counted the queries.
        assert row["vllm_prefix_cache_queries"] > 0
        assert 0 < row["vllm_prefix_cache_hit_rate"] <= 1
        assert 0 < row["cached_tokens_share"] <= 1
        assert row["users_on_one_node"] == 1.0
    assert document["goals"]["all_users_on_one_node_when_shared"] is True
