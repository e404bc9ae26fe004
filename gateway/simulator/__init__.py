"""A vLLM-like upstream simulator for the demo, the tests and the benchmarks (DESIGN.md §7)."""

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
