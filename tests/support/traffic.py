"""Steady client traffic through the real `openai` SDK, every request's outcome recorded."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import openai

from tests.support.gateway import TEST_MODEL

# Bounds every loop whatever happens to the thing under test.
MAX_TRAFFIC_SECONDS = 240.0


@dataclass(frozen=True)
class Outcome:
    """One request: when it started, how it ended, and which provider answered."""

    key: str
    stream: bool
    started: float  # time.monotonic()
    seconds: float
    status: int  # the HTTP status; 0 when no answer came (connection error or timeout)
    ok: bool  # 2xx and, for a stream, every chunk up to a finish reason
    provider: str | None
    error: str | None = None

    @property
    def ended(self) -> float:
        """When it ended (time.monotonic())."""
        return self.started + self.seconds


@dataclass
class Traffic:
    """`clients` loops per key, each sending one chat completion after another until stopped."""

    base_url: str
    keys: Sequence[str]
    clients: int = 4
    stream: bool | None = None  # None: alternate, streamed and not
    max_tokens: int = 8
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _sdks: list[openai.AsyncOpenAI] = field(default_factory=list)

    async def __aenter__(self) -> Self:
        for key in self.keys:
            # One pooled client per key, no retries: a failure is counted, never hidden.
            sdk = openai.AsyncOpenAI(
                base_url=self.base_url + "/v1",
                api_key=key,
                max_retries=0,
                timeout=60.0,
            )
            self._sdks.append(sdk)
            for index in range(self.clients):
                streamed = self.stream if self.stream is not None else index % 2 == 0
                self._tasks.append(asyncio.create_task(self._loop(sdk, key, streamed)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Let every client finish its current request, then close the SDKs."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self._tasks.clear()
        for sdk in self._sdks:
            await sdk.close()
        self._sdks.clear()

    def sent(self, key: str | None = None) -> int:
        """Requests finished so far (for one key, or all)."""
        return sum(1 for outcome in self.outcomes if key is None or outcome.key == key)

    def failed(self, key: str | None = None) -> list[Outcome]:
        """Requests that did not succeed (for one key, or all)."""
        return [o for o in self.outcomes if not o.ok and (key is None or o.key == key)]

    async def _loop(self, sdk: openai.AsyncOpenAI, key: str, stream: bool) -> None:
        deadline = time.monotonic() + MAX_TRAFFIC_SECONDS
        turn = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            turn += 1
            self.outcomes.append(await send(sdk, key, stream, self.max_tokens, turn))


async def send(
    sdk: openai.AsyncOpenAI, key: str, stream: bool, max_tokens: int, turn: int = 0
) -> Outcome:
    """One chat completion through the SDK; its outcome, never an exception."""
    started = time.monotonic()
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": f"Turn {turn}: tell me something."}
    ]
    status, ok, provider, error = 0, False, None, None
    try:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=TEST_MODEL, messages=messages, max_tokens=max_tokens, stream=stream
        )
        status = raw.status_code
        provider = raw.headers.get("x-gateway-provider")
        answer = raw.parse()
        if isinstance(answer, openai.AsyncStream):
            finished = False
            async with contextlib.aclosing(answer) as chunks:
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].finish_reason is not None:
                        finished = True
            ok = finished
            error = None if finished else "stream ended without a finish reason"
        else:
            ok = bool(answer.choices)
    except openai.APIStatusError as failure:
        status, error = failure.status_code, f"{failure.status_code}: {failure.message[:200]}"
    except openai.APIError as failure:
        error = f"{type(failure).__name__}: {str(failure)[:200]}"
    return Outcome(
        key=key,
        stream=stream,
        started=started,
        seconds=time.monotonic() - started,
        status=status,
        ok=ok,
        provider=provider,
        error=error,
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def summary(outcomes: Sequence[Outcome]) -> dict[str, float | int]:
    """Sent, failed, p50 and p99 in milliseconds."""
    seconds = [outcome.seconds for outcome in outcomes]
    return {
        "sent": len(outcomes),
        "failed": sum(1 for outcome in outcomes if not outcome.ok),
        "p50_ms": round(statistics.median(seconds) * 1000, 1) if seconds else 0.0,
        "p99_ms": round(percentile(seconds, 0.99) * 1000, 1),
    }
