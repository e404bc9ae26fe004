"""Client keys at rest: a plaintext `key: ${VAR}` is reduced to its SHA-256 digest at load."""

from __future__ import annotations

import pickle
import uuid

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.config_fleet import hash_key
from gateway.config_loading import parse_config

CONFIG = """
providers:
  - {name: node-a, url: "http://127.0.0.1:9", models: {test-model: test-model}}
keys:
  - {id: plain, key: "${PLAIN_KEY}"}
  - {id: hashed, key_sha256: "${HASHED_DIGEST}"}
"""


def load_with(plain_key: str, hashed_key: str) -> Settings:
    """The config above, with one key given in plaintext and one as its digest."""
    environ = {"PLAIN_KEY": plain_key, "HASHED_DIGEST": hash_key(hashed_key)}
    return parse_config(CONFIG, environ).settings


def test_the_catalog_holds_only_digests_and_authenticates_by_them() -> None:
    """What serves requests keeps the digest of a plaintext key, never the key; both keys work."""
    plain, hashed = f"sk-{uuid.uuid4().hex}", f"sk-{uuid.uuid4().hex}"
    catalog = Catalog(load_with(plain, hashed))
    assert {key.id: key.digest for key in catalog.keys.values()} == {
        "plain": hash_key(plain),
        "hashed": hash_key(hashed),
    }
    kept = pickle.dumps(catalog.keys)
    assert plain.encode() not in kept
    assert all(key.digest not in repr(key) for key in catalog.keys.values())
    assert catalog.authenticate(plain) is catalog.keys["plain"]
    assert catalog.authenticate(hashed) is catalog.keys["hashed"]


def test_loaded_settings_hold_no_plaintext_key() -> None:
    """The validated settings, as `serve` hands them to each worker, carry only the digest."""
    plain = f"sk-{uuid.uuid4().hex}"
    settings = load_with(plain, f"sk-{uuid.uuid4().hex}")
    assert plain.encode() not in pickle.dumps(settings)
    assert settings.keys[0].key_sha256 == hash_key(plain)
