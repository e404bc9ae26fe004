"""The request's `model` spliced into raw JSON: only the top-level value's bytes change, whatever
the strings, escapes, nesting and duplicates around it."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.edge.model_splice import replace_model

NEW = "zz-new-model-zz"


def assert_only_the_value_changed(raw: bytes, spliced: bytes) -> None:
    """The oracle: the parse of the result is the parse of `raw` with `model` set to NEW, and
    the bytes around the new value are `raw`'s, the old value between them parsing to the old
    model."""
    before = orjson.loads(raw)
    assert orjson.loads(spliced) == {**before, "model": NEW}
    value = orjson.dumps(NEW)
    at = spliced.index(value)
    prefix, suffix = spliced[:at], spliced[at + len(value) :]
    assert raw.startswith(prefix)
    assert raw.endswith(suffix)
    assert orjson.loads(raw[len(prefix) : len(raw) - len(suffix)]) == before["model"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"a","seed":18446744073709551615}',
        b'{ "z" : [1, {"model": "inner"}], "model" : "a" }',
        b'{"model":"a","z":{"model":"inner","deeper":[{"model":"x"}]}}',
        b'{"mod\\u0065l":"a","s":"}\\""}',
        b'{"\\u006Dodel":"a","model\\u0020":"b"}',
        b'{"model":"a","model":"b"}',
        b'{"model":1,"model":"b"}',
        b'{"x":{"model":"n"},"model":"a","y":{"model":"m"}}',
        b'{"x":"\\"model\\": \\"fake\\"","model":"a"}',
        b'{"x":"{\\"model\\":1}","model":"a","t":"[[["}',
        b'{"x":"a\\\\","model":"a","y":"\\\\\\"model\\\\\\":"}',
        b'{"mo del":1,"model":"a","model ":2}',
        b'{"x":["model",{"model":"q"}],"model":"a"}',
        b'{"x":"mo\\\\u0064el","model":"a","mo\\\\u0064el":"c"}',
        b'{"k":null,"model":"\\u00e9\\"x","t":true}',
        b'{"x":"\\u006dodel","model"\n\t:\r "a" ,"y":{"model" : "z"}}',
        b'{"a":"[{\\"","model":"a","b":"\\"}]","c":{"model":"z"}}',
    ],
)
def test_tricky_bodies_change_only_the_top_level_value(raw: bytes) -> None:
    """Strings holding `"model":`, escaped quotes and letters, nested and duplicate keys: only
    the last top-level `model` value changes."""
    assert_only_the_value_changed(raw, replace_model(raw, NEW))


def test_an_object_without_a_model_gains_one_at_its_end() -> None:
    """An object whose parse has no `model` gains the key at its end (and stays valid JSON)."""
    assert orjson.loads(replace_model(b'{"a": 1}', "X", has_model=False)) == {"a": 1, "model": "X"}
    assert orjson.loads(replace_model(b"{}", "X", has_model=False)) == {"model": "X"}


def test_a_million_keys_and_nested_model_keys_are_spliced_exactly() -> None:
    """The attack shapes (a million top-level keys, hundreds of thousands of nested `model`
    keys, duplicates) give the parser's answer too."""
    keys = b",".join(b'"%x":1' % index for index in range(1_000_000))
    nested = b",".join([b'{"model":"n"}'] * 200_000)
    for raw in (
        b"{" + keys + b',"model":"a"}',
        b'{"model":"a","m":[' + nested + b"]}",
        b'{"m":[' + nested + b'],"model":"a","n":[' + nested + b"]}",
        b"{" + b",".join([b'"model":"d"'] * 100_000) + b',"model":"a"}',
    ):
        assert_only_the_value_changed(raw, replace_model(raw, NEW))


KEYS = st.sampled_from(["model", "mod", "modell", "x", 'mo"del', "mo\\del", "model ", "{", "["])
TEXT = st.text(alphabet=st.sampled_from('model"\\{}[],: \n\u00e9/'), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.lists(st.tuples(KEYS, inner), max_size=4),
    max_leaves=20,
)


def encode(value: Any, chooser: random.Random) -> bytes:
    """JSON for `value` with random spacing and random \\u-escapes; a list of pairs is an
    object (so duplicate keys occur)."""
    space = chooser.choice([b"", b" ", b"\n\t", b" \r\n "])
    if isinstance(value, list) and value and all(isinstance(item, tuple) for item in value):
        members = (
            encode_string(key, chooser) + space + b":" + space + encode(item, chooser)
            for key, item in value
        )
        return b"{" + space + (b"," + space).join(members) + space + b"}"
    if isinstance(value, list):
        return b"[" + (b"," + space).join(encode(item, chooser) for item in value) + b"]"
    if isinstance(value, str):
        return encode_string(value, chooser)
    return orjson.dumps(value)


def encode_string(text: str, chooser: random.Random) -> bytes:
    """A JSON string for `text`, each character escaped as \\uXXXX at random."""
    pieces = [
        b"\\u%04x" % ord(character) if chooser.random() < 0.3 else orjson.dumps(character)[1:-1]
        for character in text
    ]
    return b'"' + b"".join(pieces) + b'"'


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.lists(st.tuples(KEYS, VALUES), max_size=6),
    model=TEXT.filter(bool),
    seed=st.integers(0, 2**32),
)
def test_any_object_gets_only_its_top_level_value_changed(
    members: list[tuple[str, Any]], model: str, seed: int
) -> None:
    """Random objects (random keys including `model`, strings of quotes, brackets and escapes,
    nesting, duplicates, spacing): the splice equals the parse-and-set oracle."""
    chooser = random.Random(seed)
    members = list(members)
    members.insert(chooser.randint(0, len(members)), ("model", model))
    raw = encode(members, chooser) if members else b'{"model":"a"}'
    assert_only_the_value_changed(raw, replace_model(raw, NEW))
