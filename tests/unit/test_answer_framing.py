"""A non-streamed 2xx is checked for a JSON object's framing, not parsed."""

from __future__ import annotations

import pytest

from gateway.dispatch.upstream import looks_like_json_object


@pytest.mark.parametrize(
    "body",
    [b"{}", b' {"id": "x", "choices": []}\n', b"\r\n\t{}" + b" " * 200, bytearray(b'{"a": 1}')],
)
def test_objects_pass(body: bytes) -> None:
    """A JSON object, with any surrounding whitespace, is accepted."""
    assert looks_like_json_object(body)


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"[1, 2, 3]", b"<html>{}</html>", b'{"id": "cut off', b"{" + b" " * 200, b"ok"],
)
def test_what_is_not_framed_as_an_object_fails(body: bytes) -> None:
    """Empty, arrays, HTML, plain text and a cut-off object are refused."""
    assert not looks_like_json_object(body)
