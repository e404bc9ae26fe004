"""Conformance: the same call made directly against a simulator node and through the gateway.

A `Target` is where a call goes and with which model name and key; `comparable` turns an
answer into what must be equal on both sides: values that differ call by call (ids, times,
generated text) become placeholders, and the model name becomes `<model>` — the documented
differences are the key, `x-gateway-*` headers and the public model name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

# Values generated per call: compared by presence and type, never by value.
VOLATILE_FIELDS = frozenset(
    {"id", "created", "created_at", "content", "text", "delta", "item_id", "previous_response_id"}
)


@dataclass(frozen=True)
class Target:
    """Where a call goes: a node directly (upstream model id) or the gateway (public name)."""

    name: str
    root: str
    model: str
    api_key: str

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's base URL."""
        return self.root + "/v1"


def comparable(value: Any, model: str) -> Any:
    """`value` with volatile fields replaced by their type and the target's model by `<model>`."""
    if isinstance(value, dict):
        return {
            key: (
                f"<{type(item).__name__}>"
                if key in VOLATILE_FIELDS and item is not None
                else comparable(item, model)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [comparable(item, model) for item in value]
    if value == model:
        return "<model>"
    return value


def sse_payloads(body: bytes) -> list[Any]:
    """The `data:` payloads of an event stream, parsed (`[DONE]` stays a string)."""
    payloads: list[Any] = []
    for line in body.splitlines():
        if line.startswith(b"data:"):
            data = line[5:].strip()
            payloads.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return payloads


async def raw_call(
    target: Target,
    method: str,
    path: str,
    *,
    body: bytes | aiohttp.FormData | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Mapping[str, str], bytes]:
    """One raw HTTP request to the target; status, headers and body."""
    sent = {"Authorization": f"Bearer {target.api_key}", **(headers or {})}
    if isinstance(body, bytes):
        sent.setdefault("Content-Type", "application/json")
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, target.root + path, data=body, headers=sent) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


async def read_until_broken(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """A response's body as far as it arrived, and whether its transfer broke before its end."""
    received = b""
    try:
        async for piece in response.content.iter_any():
            received += piece
    except aiohttp.ClientPayloadError:
        return received, True
    return received, False


async def post_until_broken(
    url: str, body: bytes, headers: Mapping[str, str]
) -> tuple[int, Mapping[str, str], bytes, bool]:
    """POST `body` to `url`; status, headers, the body as far as it came, and whether its
    transfer broke."""
    sent = {"Content-Type": "application/json", **headers}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=sent) as response,
    ):
        received, broken = await read_until_broken(response)
        return response.status, CIMultiDict(response.headers), received, broken
