"""The model a tokenize/detokenize body without `model` goes to (`Catalog.default_model`)."""

from __future__ import annotations

from typing import Any

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.config_fleet import hash_key


def catalog(keys: list[dict[str, Any]], models: tuple[str, ...] = ()) -> Catalog:
    """Two providers serving `alpha`, `beta` and `gamma`, with these keys and `models` order."""
    return Catalog(
        Settings.model_validate(
            {
                "providers": [
                    {"name": "a", "url": "http://a", "models": {"beta": "b", "alpha": "a"}},
                    {"name": "b", "url": "http://b", "models": {"gamma": "g"}},
                ],
                "models": [{"name": name} for name in models],
                "keys": keys,
            }
        )
    )


def key(models: list[str], route: dict[str, str] | None = None) -> dict[str, Any]:
    """A key allowed `models`."""
    return {"id": "k", "key_sha256": hash_key("sk-k"), "models": models, "route": route or {}}


def test_a_key_with_one_model_gets_it() -> None:
    """A key that may use one model tokenizes with it."""
    found = catalog([key(["gamma"])])
    assert found.default_model(found.keys["k"]) == "gamma"


def test_a_key_listing_several_gets_the_first_it_lists_and_can_reach() -> None:
    """The key's own order decides; a model its route cannot reach is passed over."""
    found = catalog([key(["gamma", "alpha"])])
    assert found.default_model(found.keys["k"]) == "gamma"
    fixed = catalog([key(["gamma", "alpha"], {"strategy": "fixed", "fixed": "a"})])
    assert fixed.default_model(fixed.keys["k"]) == "alpha"


def test_a_wildcard_key_gets_the_models_sections_first_then_the_first_by_name() -> None:
    """For `*`: the `models` section's order, else the first name."""
    ordered = catalog([key(["*"])], models=("gamma", "beta"))
    assert ordered.default_model(ordered.keys["k"]) == "gamma"
    unordered = catalog([key(["*"])])
    assert unordered.default_model(unordered.keys["k"]) == "alpha"
