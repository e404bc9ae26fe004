"""The simulator's vLLM-style `/metrics`, parsed with prometheus-client's own parser."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.simulator import Faults
from tests.support.simulators import InProcessSimulator

CHAT = {"model": "llama", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 3}


async def scrape(session: aiohttp.ClientSession, node: InProcessSimulator) -> dict[str, Sample]:
    """Every sample of the node's metrics by sample name (one label set per name here)."""
    async with session.get(f"{node.url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    samples: dict[str, Sample] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != "vllm:request_success_total":
                samples[sample.name] = sample
    return samples


async def test_metrics_report_vllm_gauges_and_counters_by_model_name() -> None:
    """Running, waiting and token-counted prefix-cache counters carry vLLM's `model_name`."""
    async with (
        InProcessSimulator("n", models=["llama", "qwen"]) as node,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(2):
            async with session.post(f"{node.url}/v1/chat/completions", json=CHAT):
                pass
        samples = await scrape(session, node)
    assert samples["vllm:num_requests_running"].value == 0
    assert samples["vllm:num_requests_waiting"].value == 0
    queries = samples["vllm:prefix_cache_queries_total"]
    hits = samples["vllm:prefix_cache_hits_total"]
    assert queries.labels["model_name"] == "llama"
    assert (queries.value, hits.value) == (2 * 14, 14)
    assert samples["vllm:generation_tokens_total"].value == 6
    assert samples["vllm:prompt_tokens_total"].value == 28


async def test_finished_requests_are_counted_by_reason() -> None:
    """`vllm:request_success_total` counts finished sequences per finish reason."""
    async with InProcessSimulator("n") as node, aiohttp.ClientSession() as session:
        async with session.post(f"{node.url}/v1/chat/completions", json=CHAT):
            pass
        async with session.get(f"{node.url}/metrics") as response:
            text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    (sample,) = families["vllm:request_success"].samples
    assert sample.labels["finished_reason"] == "length"
    assert sample.value == 1


async def test_metrics_add_the_faked_waiting_load() -> None:
    """`extra_waiting` set at start shows up in the waiting gauge."""
    async with (
        InProcessSimulator("n", faults=Faults(extra_waiting=40)) as node,
        aiohttp.ClientSession() as session,
    ):
        samples = await scrape(session, node)
    assert samples["vllm:num_requests_waiting"].value == 40
