"""A vLLM-like upstream simulator for the demo, the tests and the benchmarks (DESIGN.md §7).

- `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`: OpenAI shapes,
  streamed or not; the text is the node's name then words picked by the request number.
- `GET /metrics`: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`, the KV cache's size
  (`vllm:cache_config_info`) and usage (`vllm:kv_cache_usage_perc`: the running sequences'
  share, as vLLM counts it) and a few more.
- `GET|POST /sim/faults`, `GET /sim/stats`, `POST /sim/reset`: fault injection and what the
  node saw, for tests. Token counts are approximate; see `prompts`.
"""

from gateway.simulator.app import create_simulator_app
from gateway.simulator.cli import main
from gateway.simulator.options import Faults, Mode, SimulatorOptions, Timing
from gateway.simulator.server import SimulatorServer
from gateway.simulator.state import SimulatorState

__all__ = [
    "Faults",
    "Mode",
    "SimulatorOptions",
    "SimulatorServer",
    "SimulatorState",
    "Timing",
    "create_simulator_app",
    "main",
]
