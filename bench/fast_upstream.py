"""A minimal, fast OpenAI-like upstream for throughput benchmarks: canned answers, no latency.

Run: `python -m bench.fast_upstream --port 9000`. It answers every POST with a small
`chat.completion` (or, when the body asks for `"stream": true`, a few SSE chunks then
`data: [DONE]`, with vLLM's usage-only chunk before it when the body asks for
`stream_options.include_usage`), and GET /metrics with a vLLM-style load gauge. A raw asyncio
protocol on uvloop with HTTP/1.1 keep-alive and no framework, so one core serves far more
requests than any proxy in front of it: the "direct" target of `gateway bench throughput` is this
process on its own core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from typing import cast

import uvloop

MODEL = "bench-model"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
STREAM = re.compile(rb'"stream"\s*:\s*true')
INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def _completion() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hi there!"},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        },
        separators=(",", ":"),
    ).encode()


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    document = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def _usage_chunk() -> bytes:
    document = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [],
        "usage": USAGE,
    }
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def _chunked(parts: list[bytes]) -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return framed + b"0\r\n\r\n"


def responses() -> tuple[bytes, bytes, bytes, bytes]:
    """The canned non-streamed, streamed, streamed-with-usage and /metrics answers, whole HTTP
    responses."""
    body = _completion()
    plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    events = [
        _chunk({"role": "assistant", "content": ""}, None),
        *(_chunk({"content": word}, None) for word in ("Hi", " there", "!")),
        _chunk({}, "stop"),
        b"data: [DONE]\n\n",
    ]
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    streamed = head + _chunked(events)
    with_usage = head + _chunked([*events[:-1], _usage_chunk(), events[-1]])
    gauge = f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0\n'.encode()
    metrics = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(gauge), gauge)
    )
    return plain, streamed, with_usage, metrics


class Upstream(asyncio.Protocol):
    """One keep-alive connection: parse request heads and bodies, answer each from the cans."""

    def __init__(self, cans: tuple[bytes, bytes, bytes, bytes]) -> None:
        """Start with an empty buffer."""
        self._plain, self._streamed, self._with_usage, self._metrics = cans
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to write answers on."""
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        """Answer every complete request in the buffer, in order."""
        buffer = self._buffer + data if self._buffer else data
        answers = []
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = buffer[: head_end + 2]
            match = CONTENT_LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            end = head_end + 4 + length
            if len(buffer) < end:
                break
            if head.startswith(b"GET"):
                answers.append(self._metrics)
            elif STREAM.search(buffer, head_end + 4, end):
                usage = INCLUDE_USAGE.search(buffer, head_end + 4, end)
                answers.append(self._with_usage if usage else self._streamed)
            else:
                answers.append(self._plain)
            buffer = buffer[end:]
        self._buffer = buffer
        if answers and self._transport is not None:
            self._transport.write(b"".join(answers))


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    cans = responses()
    server = await loop.create_server(lambda: Upstream(cans), host, port, backlog=4096)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    print(f"fast upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await stopped.wait()


def main() -> int:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    uvloop.run(serve(options.host, options.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
