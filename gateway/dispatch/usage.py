"""Token usage read from upstream answers, cheaply, and the usage event a client did not ask for.

A whole JSON answer carries `usage` near its end: it is found with one reverse byte search and
only that object is parsed. A stream carries it in its last event when the request asked for
`stream_options.include_usage`; the gateway asks for it on every streamed chat or completions
request, and when the client did not ask, the usage-only event (`"choices": []` with `usage`) is
taken out of the stream, so the client receives exactly the bytes it would have received.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

_USAGE = b'"usage"'
_DECODER = json.JSONDecoder()
# The most bytes of an incomplete event held back while usage events are taken out: a usage
# event is a few hundred bytes; anything longer is not one, and passes on.
MAX_HELD_EVENT_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one answer reported: prompt, completion, and prompt tokens served from cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def usage_of(value: object) -> Usage | None:
    """A `usage` object's tokens (chat and completions names, or the Responses API's
    `input_tokens` / `output_tokens`); None unless it is an object with integer counts."""
    if not isinstance(value, dict):
        return None
    if "input_tokens" in value:  # the Responses API's names
        prompt, completion = value["input_tokens"], value.get("output_tokens", 0)
        details = value.get("input_tokens_details")
    else:
        prompt, completion = value.get("prompt_tokens", 0), value.get("completion_tokens", 0)
        details = value.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    cached = cached or 0
    # Plain checks rather than a generator: this runs once per answer.
    if not (isinstance(prompt, int) and isinstance(completion, int) and isinstance(cached, int)):
        return None
    if prompt < 0 or completion < 0 or cached < 0:
        return None
    return Usage(prompt, completion, cached)


def usage_from_body(body: bytes | bytearray) -> Usage | None:
    """The `usage` of a whole JSON answer, found by its last top-level-looking key."""
    index = body.rfind(_USAGE)
    while index > 0 and body[index - 1] == 0x5C:  # an escaped quote inside a string
        index = body.rfind(_USAGE, 0, index)
    if index < 0:
        return None
    # The usual answer ends with `"usage":{...}}`: that object alone, parsed by orjson.
    rest = bytes(body[index + len(_USAGE) :]).rstrip()
    if rest.endswith(b"}") and rest.lstrip().startswith(b":"):
        try:
            return usage_of(orjson.loads(rest.lstrip()[1:-1]))
        except orjson.JSONDecodeError:
            pass  # `usage` was not the last key: read the value alone, below
    tail = rest.decode("utf-8", "replace").lstrip()
    if not tail.startswith(":"):
        return None
    try:
        value, _ = _DECODER.raw_decode(tail, len(tail) - len(tail[1:].lstrip()))
    except ValueError:
        return None
    return usage_of(value)


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def with_usage_requested(body: bytes) -> bytes:
    """The body with `"stream_options":{"include_usage":true},` spliced in right after its
    opening brace (the body is a JSON object with at least `model`, so a comma always follows);
    no other byte changes."""
    opening = body.find(b"{")
    if opening < 0:
        return body
    return body[: opening + 1] + _INCLUDE_USAGE + body[opening + 1 :]


def asks_for_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed request asked for the usage event itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class StreamUsage:
    """Reads the usage of an event stream as it passes, and takes out the usage-only event
    when `strip` (the gateway asked for it, the client did not)."""

    __slots__ = ("_held", "strip", "usage")

    def __init__(self, *, strip: bool) -> None:
        """Start before the stream's first byte."""
        self.strip = strip
        self.usage: Usage | None = None
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of `chunk` to pass on now (all of them unless stripping)."""
        if not self.strip:
            if _USAGE in chunk:
                self._read_events(chunk)
            return chunk
        data = self._held + chunk if self._held else chunk
        if data.endswith(b"\n\n"):  # the usual case: a chunk of whole events
            complete, self._held = data, b""
        else:
            end = data.rfind(b"\n\n")
            complete, rest = (data[: end + 2], data[end + 2 :]) if end >= 0 else (b"", data)
            if len(rest) > MAX_HELD_EVENT_BYTES:
                complete, rest = data, b""
            self._held = rest
        if _USAGE not in complete:
            return complete
        return self._without_usage_events(complete)

    def flush(self) -> bytes:
        """What is still held at the stream's end."""
        held, self._held = self._held, b""
        if held and _USAGE in held:
            return self._without_usage_events(held)
        return held

    def _read_events(self, chunk: bytes) -> None:
        for line in chunk.split(b"\n"):
            if _USAGE in line and line.startswith(b"data:"):
                self._note(line)

    def _without_usage_events(self, data: bytes) -> bytes:
        """`data` (whole events) without its usage-only events; only the events that mention
        `"usage"` are looked at, the rest pass as they are."""
        kept = []
        start = 0  # where the bytes not yet kept begin
        index = data.find(_USAGE)
        while index >= 0:
            previous = data.rfind(b"\n\n", 0, index)
            opening = 0 if previous < 0 else previous + 2
            closing = data.find(b"\n\n", index)
            end = len(data) if closing < 0 else closing + 2
            if self._is_usage_only(data[opening:end]):
                kept.append(data[start:opening])
                start = end
            index = data.find(_USAGE, end)
        if not kept:
            return data
        kept.append(data[start:])
        return b"".join(kept)

    def _is_usage_only(self, event: bytes) -> bool:
        """Note the event's usage; True when it is the usage-only event to take out."""
        payload = self._note(event.strip())
        return isinstance(payload, dict) and payload.get("choices") == [] and "usage" in payload

    def _note(self, line: bytes) -> object:
        if not line.startswith(b"data:"):
            return None
        try:
            payload = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return None
        if isinstance(payload, dict):
            found = usage_of(payload.get("usage"))
            if found is not None:
                self.usage = found
        return payload
