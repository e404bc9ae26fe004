"""Micro-benchmark of the credential redactor on successful answers: median microseconds per
call on chat completions of about 1 KiB, 64 KiB and 1 MiB of seeded random words (as UTF-8, and
with `\\u` escapes, which also look for the escaped forms), and on one streamed event, none
holding the credential (the usual case), against one `bytes.find` of the raw credential.

Run `gateway bench redaction`; prints a table and writes `bench/results/redaction.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import timeit
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from gateway.shared.redaction import Redactor

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "redaction.json"
CREDENTIAL = "sk-live-3f9c2a7b1e0d4c6f8a2b5e7d9c1a3f5b"
SIZES = (1024, 64 * 1024, 1024 * 1024)


@dataclass(frozen=True)
class Measurement:
    """The timing of one scenario on one body size."""

    scenario: str
    body_bytes: int
    median_microseconds: float
    find_microseconds: float  # a bytes.find of the raw credential on the same body
    megabytes_per_second: float


WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "can",
    "has",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "model",
    "token",
    "request",
    "answer",
    "stream",
    "gateway",
    "café",
    "naïve",
    "résumé",
    "über",
    "straße",
]


def completion(size: int, escaped: bool) -> bytes:
    """A chat completion of about `size` bytes of seeded random words, its text as UTF-8 or
    with `\\u` escapes (the non-ASCII words escaped)."""
    generator = random.Random(size)
    words: list[str] = []
    length = 0
    while length < size:
        words.append(generator.choice(WORDS))
        length += len(words[-1]) + 1
    text = " ".join(words)
    document = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }
    return json.dumps(document, ensure_ascii=True).encode() if escaped else orjson.dumps(document)


def median_microseconds(call: Callable[[], object], repeats: int) -> float:
    """The median time of `call` over `repeats` runs of enough calls for ~0.1 s each."""
    timer = timeit.Timer(call)
    calls, elapsed = timer.autorange()
    calls = max(calls, int(calls * 0.1 / elapsed) if elapsed else calls)
    return statistics.median(total / calls * 1e6 for total in timer.repeat(repeats, calls))


def measure(scenario: str, body: bytes, repeats: int) -> Measurement:
    """Time the redaction of `body` (and, for scale, one find of the raw credential)."""
    redactor = Redactor(CREDENTIAL)
    if scenario == "stream event":
        stream = redactor.stream()
        median = median_microseconds(lambda: stream.feed(body), repeats)
    else:
        median = median_microseconds(lambda: redactor.redact(body), repeats)
    raw = CREDENTIAL.encode()
    floor = median_microseconds(lambda: body.find(raw), repeats)
    return Measurement(scenario, len(body), median, floor, len(body) / median)


def run(repeats: int) -> list[Measurement]:
    """Every body size, ASCII and escaped, and one streamed event."""
    event = b"data: " + orjson.dumps({"choices": [{"delta": {"content": " word"}}]}) + b"\n\n"
    results = [
        measure(f"answer, {'escaped' if escaped else 'ascii'}", completion(size, escaped), repeats)
        for escaped in (False, True)
        for size in SIZES
    ]
    results.append(measure("stream event", event, repeats))
    return results


def table(measurements: Sequence[Measurement]) -> str:
    """Format the measurements as a plain-text table."""
    header = f"{'scenario':<18} {'bytes':>9} {'median µs':>10} {'find µs':>8} {'MB/s':>8}"
    rows = [
        f"{each.scenario:<18} {each.body_bytes:>9} {each.median_microseconds:>10.2f} "
        f"{each.find_microseconds:>8.2f} {each.megabytes_per_second:>8.0f}"
        for each in measurements
    ]
    return "\n".join([header, "-" * len(header), *rows])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    arguments = parser.parse_args(argv)
    measurements = run(arguments.repeats)
    print(table(measurements))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "redaction",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "credential_chars": len(CREDENTIAL),
        "results": [asdict(each) for each in measurements],
    }
    arguments.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
