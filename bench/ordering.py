"""Micro-benchmark of `order()`: median microseconds per call for 3, 16 and 64 candidates.

Run `python -m bench.ordering`; prints a table and writes `bench/results/ordering.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import timeit
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.routing.ordering import OrderingRequest, ProviderState, order, tiebreak_ranks

CANDIDATE_COUNTS = (3, 16, 64)
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "ordering.json"


@dataclass(frozen=True)
class Measurement:
    """The timing of one scenario at one candidate count."""

    scenario: str
    candidates: int
    calls_per_repeat: int
    repeats: int
    median_microseconds: float
    min_microseconds: float
    max_microseconds: float


def realistic_candidates(count: int, seed: int) -> list[ProviderState]:
    """Return `count` providers with mixed bands, start times, aliases and one cooling down."""
    generator = random.Random(seed)
    names = [f"gpu-{index:02d}" for index in range(count)]
    ranks = tiebreak_ranks(names, seed)
    candidates = []
    for index, name in enumerate(names):
        cooling = count > 2 and index == 1
        candidates.append(
            ProviderState(
                name=name,
                routing_identity=f"account-{index // 2}" if index % 4 == 0 else name,
                cooling=cooling,
                available=not cooling and generator.random() > 0.1,
                band=generator.choice((-1, 0, 0, 0, 0, 1, 2)),
                last_started=None if index % 5 == 0 else generator.uniform(0, 1000),
                tiebreak=ranks[name],
            )
        )
    return candidates


def scenarios(count: int, seed: int) -> dict[str, OrderingRequest]:
    """Return a shared-binding request (sticky, preference active) and a new-session request."""
    candidates = realistic_candidates(count, seed)
    names = [state.name for state in candidates]
    generator = random.Random(seed + 1)
    counts = {state.routing_identity: generator.randint(0, 40) for state in candidates}
    return {
        "sticky+preferred": OrderingRequest(
            candidates=candidates,
            preferred=frozenset(names[: max(1, count // 3)]),
            sticky=names[count // 4],
        ),
        "new-session": OrderingRequest(
            candidates=candidates,
            new_session=True,
            session_counts=counts,
        ),
    }


def measure(scenario: str, request: OrderingRequest, repeats: int) -> Measurement:
    """Time `order(request)`; the median over `repeats` runs of enough calls for ~0.1 s each."""
    timer = timeit.Timer(lambda: order(request))
    calls, elapsed = timer.autorange()
    calls = max(calls, int(calls * 0.1 / elapsed) if elapsed else calls)
    per_call = [total / calls * 1e6 for total in timer.repeat(repeat=repeats, number=calls)]
    return Measurement(
        scenario=scenario,
        candidates=len(request.candidates),
        calls_per_repeat=calls,
        repeats=repeats,
        median_microseconds=statistics.median(per_call),
        min_microseconds=min(per_call),
        max_microseconds=max(per_call),
    )


def run(repeats: int, seed: int) -> list[Measurement]:
    """Measure every scenario at every candidate count."""
    return [
        measure(name, request, repeats)
        for count in CANDIDATE_COUNTS
        for name, request in scenarios(count, seed).items()
    ]


def table(measurements: Sequence[Measurement]) -> str:
    """Format the measurements as a plain-text table."""
    header = f"{'scenario':<18} {'candidates':>10} {'median µs':>10} {'min µs':>8} {'max µs':>8}"
    rows = [
        f"{each.scenario:<18} {each.candidates:>10} {each.median_microseconds:>10.2f} "
        f"{each.min_microseconds:>8.2f} {each.max_microseconds:>8.2f}"
        for each in measurements
    ]
    return "\n".join([header, "-" * len(header), *rows])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    arguments = parser.parse_args(argv)
    measurements = run(arguments.repeats, arguments.seed)
    print(table(measurements))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "ordering",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seed": arguments.seed,
        "results": [asdict(each) for each in measurements],
    }
    arguments.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
