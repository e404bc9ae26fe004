"""Model cards: what nodes' `/v1/models` report, and the public entry built from them."""

from __future__ import annotations

import orjson

from gateway.catalog import Provider
from gateway.dispatch.model_cards import ModelCard, model_object, parse_cards


def provider(name: str, models: dict[str, str]) -> Provider:
    """A provider serving `models` (public → upstream)."""
    return Provider(
        name=name,
        routing_identity=name,
        base_url=f"http://{name}",
        upstream_models=models,
        credential=None,
        group=None,
        max_concurrency=None,
        min_start_interval_seconds=0,
    )


def test_cards_are_read_from_vllms_list_and_odd_entries_left_out() -> None:
    """`max_model_len` and `parent` are read; wrong types are unknown, entries without an id
    are skipped."""
    body = orjson.dumps(
        {
            "data": [
                {"id": "org/base", "max_model_len": 4096, "parent": None},
                {"id": "org/adapter", "max_model_len": True, "parent": "org/base"},
                {"max_model_len": 1},
                "junk",
            ]
        }
    )
    assert parse_cards(body) == {
        "org/base": ModelCard(4096, None),
        "org/adapter": ModelCard(None, "org/base"),
    }


def test_the_public_entry_takes_the_smallest_context_and_the_public_parent() -> None:
    """A request must fit wherever it lands: the smallest `max_model_len`; an adapter's parent
    reads as the public name its node's base model has at the gateway."""
    first = provider("a", {"chat": "org/adapter", "base": "org/base"})
    second = provider("b", {"chat": "org/adapter-b"})
    cards = {
        "a": {"org/adapter": ModelCard(8192, "org/base")},
        "b": {"org/adapter-b": ModelCard(2048, "org/unmapped")},
    }
    entry = model_object("chat", [first], cards)
    assert (entry["root"], entry["parent"], entry["max_model_len"]) == ("chat", "base", 8192)
    both = model_object("chat", [first, second], cards)
    assert (both["parent"], both["max_model_len"]) == (None, 2048)
    assert model_object("chat", [first], {})["max_model_len"] is None
