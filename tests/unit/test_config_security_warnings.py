"""`check-config` warns on risky settings: credentials in URLs, secrets over plain http to other
hosts, short admin tokens."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gateway.config_loading import parse_config
from tests.support.gateway import settings_dict


def warnings_for(**changes: Any) -> list[str]:
    """The warnings for the test config with one provider changed (and `server` settings)."""
    config = settings_dict({"node-a": "http://127.0.0.1:9000"})
    config["providers"][0].update(changes.pop("provider", {}))
    config["server"].update(changes.pop("server", {}))
    loaded = parse_config(yaml.safe_dump(config), {})
    return [f"{problem.path}: {problem.message}" for problem in loaded.warnings]


def test_a_safe_config_has_no_warnings() -> None:
    """Loopback http with a key, https elsewhere, a long admin token: no warning."""
    assert warnings_for(provider={"api_key": "k"}, server={"admin_token": "x" * 24}) == []
    assert warnings_for(provider={"url": "https://api.example.com", "api_key": "k"}) == []


def test_credentials_in_a_provider_url_are_warned_about() -> None:
    """`https://user:pass@host` gets a warning on the provider's url."""
    warnings = warnings_for(provider={"url": "https://user:secret@api.example.com"})
    assert len(warnings) == 1
    assert warnings[0].startswith("providers[0].url:")
    assert "secret" not in warnings[0]


@pytest.mark.parametrize("host", ["10.0.0.5:8000", "api.example.com", "[2001:db8::1]:80"])
def test_a_key_over_plain_http_off_this_machine_is_warned_about(host: str) -> None:
    """An `api_key` sent over http to a non-loopback host gets a warning; without a key, none."""
    warnings = warnings_for(provider={"url": f"http://{host}", "api_key": "sk-provider"})
    assert [warning.split(":")[0] for warning in warnings] == ["providers[0].api_key"]
    assert warnings_for(provider={"url": f"http://{host}"}) == []


def test_a_short_admin_token_is_warned_about() -> None:
    """An admin token under 24 characters gets a warning that does not show it."""
    warnings = warnings_for(server={"admin_token": "abcde"})
    assert len(warnings) == 1
    assert warnings[0].startswith("server.admin_token:")
    assert "abcde" not in warnings[0]
