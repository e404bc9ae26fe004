"""A JSON request body read for routing without holding the event loop: inline when its parse
is cheap, in a helper process when it may not be.

orjson builds a Python object for every value, and the costly ones are containers and object
keys: a body of a million distinct keys takes ~200 ms to parse, an array of 2.7 M empty arrays
~450 ms, whatever parser runs it (orjson holds the GIL, so a thread would stall the loop just
the same). What a body can cost is bounded from above at C speed before parsing: every `{`,
`[` and `:` (even inside a string) may be a container or a key, every `,` another value. A body
under `INLINE_BUDGET_NS` by that bound (every body under 40 KB; a 9 MB conversation of long
messages) is parsed here; any other goes to one helper process per worker, which parses and
checks it as the inline path does and answers with only what routing reads (the top-level
scalars, the conversation's stable head, where `model`'s value lies): the worker keeps serving
while it runs, and the reply costs nothing to unpickle whatever the body held.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from gateway.edge.endpoints import ClientRequest, EndpointSpec, parse_request
from gateway.edge.model_splice import model_value_span
from gateway.edge.payload import Payload
from gateway.routing.conversations import stable_head
from gateway.shared.errors import GatewayError

HEAVY_TOKEN_NS = 500
"""The most one `{`, `[` or `:` costs the parse: a new distinct key (a string, a hash, a dict
insert) measured ~200 ns, an empty array with the cyclic collector's share up to ~500 ns."""

LIGHT_TOKEN_NS = 12
"""The most one other value costs (a number, a string, `null`), measured ~10 ns."""

INLINE_BUDGET_NS = 20_000_000
"""A body whose bound is under this (20 ms) is parsed on the event loop."""

_SMALL = INLINE_BUDGET_NS // HEAVY_TOKEN_NS
"""Bodies this short cannot exceed the budget (a token is at least one byte): not counted."""

_NOT_HEAVY = bytes(byte for byte in range(256) if byte not in b"{[:")

# The top-level fields routing reads of a body parsed away (see `_routing_view`).
_SCALAR_FIELDS = (
    "model",
    "stream",
    "stream_options",
    "store",
    "request_id",
    "previous_response_id",
    "user",
    "prompt_cache_key",
)


def parse_cost_bound_ns(raw: bytes) -> int:
    """An upper bound on what orjson's parse of `raw` costs, from four byte counts."""
    if len(raw) <= _SMALL:
        return len(raw) * HEAVY_TOKEN_NS
    heavy = len(raw.translate(None, _NOT_HEAVY))
    return heavy * HEAVY_TOKEN_NS + raw.count(b",") * LIGHT_TOKEN_NS


async def read_request(spec: EndpointSpec, raw: bytes, head_bytes: int) -> ClientRequest:
    """What routing needs from a JSON (or absent) request body; a 400 GatewayError when it is
    wrong (the same one, whichever way it was parsed). `head_bytes`: the conversation head's
    length, computed in the helper for a body parsed there."""
    if spec.body != "json" or parse_cost_bound_ns(raw) <= INLINE_BUDGET_NS:
        return parse_request(spec, raw)
    loop = asyncio.get_running_loop()
    for attempt in (1, 2):
        try:
            summary = await loop.run_in_executor(
                _HELPER.executor(), summarize, spec, raw, head_bytes
            )
            break
        except BrokenProcessPool:  # the helper died (killed, out of memory): a new one, once
            close_pool()
            if attempt == 2:
                raise GatewayError(
                    503, "The request body could not be parsed; try again.", "parser_busy"
                ) from None
    if summary[0] == "error":
        _, status, message, code, param = summary
        raise GatewayError(status, message, code, param=param)
    _, model, stream, view, previous, head, span = summary
    payload = Payload(raw=raw, data=view, model=model, stream=stream, model_span=span)
    return ClientRequest(
        model, stream, view, previous, payload.for_upstream, known_head=(head_bytes, head)
    )


def summarize(spec: EndpointSpec, raw: bytes, head_bytes: int) -> tuple[Any, ...]:
    """In the helper: the body parsed and checked as `parse_request` does, answered as
    ("ok", model, stream, routing view, previous_response_id, stable head, model value span)
    or ("error", status, message, code, param)."""
    try:
        request = parse_request(spec, raw)
    except GatewayError as error:
        return ("error", error.status, error.message, error.code, error.param)
    span = model_value_span(raw)
    return (
        "ok",
        request.model,
        request.stream,
        _routing_view(request.data),
        request.previous_response_id,
        stable_head(request.data, head_bytes),
        span,
    )


def _routing_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields routing reads besides the conversation head, each as small as reads the
    same: a container stands as an empty one of its kind (only a string or a flag is ever
    read from them, or their presence), `metadata` as its `session_id` alone."""
    view = {name: _small(data[name]) for name in _SCALAR_FIELDS if name in data}
    metadata = data.get("metadata")
    if isinstance(metadata, Mapping):
        view["metadata"] = (
            {"session_id": _small(metadata["session_id"])} if "session_id" in metadata else {}
        )
    elif "metadata" in data:
        view["metadata"] = _small(metadata)
    options = data.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage") is True:
        view["stream_options"] = {"include_usage": True}
    return view


def _small(value: Any) -> Any:
    """A scalar as it is; a container as an empty one of its kind."""
    if isinstance(value, Mapping):
        return {}
    if isinstance(value, list):
        return []
    return value


class _Helper:
    """The worker's helper process, started at the first body that needs it (spawned: a fork
    of a running event loop's process is not safe)."""

    pool: ProcessPoolExecutor | None = None

    def executor(self) -> ProcessPoolExecutor:
        """The helper, started if it is not."""
        if self.pool is None:
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self.pool

    def close(self) -> None:
        """Stop the helper, if one was started."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_HELPER = _Helper()


def close_pool() -> None:
    """Stop the helper process, if one was started (at shutdown, or once it broke)."""
    _HELPER.close()
