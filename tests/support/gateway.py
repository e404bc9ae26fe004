"""Gateway settings for tests, built from upstream URLs (`bench.launcher` runs the processes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from gateway.config import Settings
from gateway.config_fleet import hash_key

TEST_KEY = "sk-test-key-0123456789"
OTHER_KEY = "sk-other-key-9876543210"
TEST_MODEL = "test-model"
UPSTREAM_MODEL = "org/test-model-upstream"


def settings_dict(
    upstreams: Mapping[str, str],
    *,
    model: str = TEST_MODEL,
    upstream_model: str = UPSTREAM_MODEL,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A config mapping: one provider per upstream URL serving `model`, and two keys."""
    config: dict[str, Any] = {
        # A short lame duck keeps process tests quick; the lifecycle tests set their own.
        "server": {
            "max_body_bytes": 64 * 1024,
            "shutdown_timeout_seconds": 10,
            "drain_delay_seconds": 0.5,
        },
        "routing": {"connect_timeout_seconds": 2, "first_byte_timeout_seconds": 10},
        "providers": [
            {"name": name, "url": url, "models": {model: upstream_model, "other-model": "other"}}
            for name, url in upstreams.items()
        ],
        "keys": [
            {"id": "team-a", "key_sha256": hash_key(TEST_KEY), "models": ["*"]},
            {"id": "team-b", "key_sha256": hash_key(OTHER_KEY), "models": ["other-model"]},
        ],
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def build_settings(upstreams: Mapping[str, str], **options: Any) -> Settings:
    """Validated settings for `settings_dict`."""
    return Settings.model_validate(settings_dict(upstreams, **options))


async def answers(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether the gateway at `url` answers /healthz yet."""
    try:
        async with session.get(url + "/healthz") as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


def chat_body(content: str = "Hello there", **fields: Any) -> dict[str, Any]:
    """A small chat-completions request body for TEST_MODEL."""
    return {"model": TEST_MODEL, "messages": [{"role": "user", "content": content}], **fields}


def provider_names(settings: Settings) -> Sequence[str]:
    """The configured provider names, in order."""
    return [provider.name for provider in settings.providers]
