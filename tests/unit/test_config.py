"""Config loading: the example contract, interpolation, and every problem reported at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config_fleet import hash_key
from gateway.config_loading import ConfigError, parse_config
from gateway.config_service import REPLACED_SHEDDING_SETTINGS

EXAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "config.example.yaml"
DIGEST = hash_key("sk-test")

MINIMAL = f"""
providers:
  - name: gpu-a
    url: http://127.0.0.1:9001
    models: {{llama: meta-llama/Llama-3.1-8B-Instruct}}
keys:
  - id: team-a
    key_sha256: {DIGEST}
"""


def problems_of(text: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Parse text expecting failure; return {path: message}."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ or {})
    return {problem.path: problem.message for problem in caught.value.problems}


def test_minimal_config_gets_documented_defaults() -> None:
    """A minimal file validates and every omitted field takes the contract's default."""
    settings = parse_config(MINIMAL, {}).settings
    assert settings.server.port == 8080
    assert settings.server.max_body_bytes == 10485760
    assert settings.server.admin_token is None
    assert settings.database.url is None
    assert settings.database.embedded_data_dir == ".gateway/pgdata"
    assert settings.affinity.ttl_seconds == 300
    assert settings.affinity.lookup_timeout_ms == 50
    assert settings.affinity.spill.min_load == 32
    assert settings.affinity.spill.ratio == 1.5
    assert settings.routing.failover_budget == 3
    assert settings.routing.latency_band_fraction == 0.15
    assert settings.routing.mode_header == "x-gateway-mode"
    assert settings.keys[0].models == ["*"]
    assert settings.keys[0].route.strategy == "auto"
    assert settings.providers[0].identity == "gpu-a"


def test_example_config_is_valid_once_its_placeholders_are_filled() -> None:
    """The shared example parses with real values in place of its elided digest and secrets."""
    text = EXAMPLE.read_text(encoding="utf-8").replace("5f0c…", DIGEST)
    loaded = parse_config(text, {"HOSTED_1_KEY": "upstream-secret"})
    settings = loaded.settings
    assert [provider.name for provider in settings.providers] == ["gpu-a", "gpu-b", "hosted-1"]
    assert settings.providers[2].identity == "hosted-account-7"
    assert settings.group_members()["fast-lane"] == frozenset({"gpu-b"})
    assert settings.group_members()["h100-pool"] == frozenset({"gpu-a", "gpu-b"})
    assert settings.orgs[0].auto_model is not None
    assert settings.orgs[0].auto_model.aliases == {"build": "code", "plan": "architect"}
    # The shared example may still name load-shedding settings this build retired: they load
    # with a warning naming their replacement, and nothing else is warned about.
    assert {problem.path for problem in loaded.warnings} <= {
        f"server.{name}" for name in REPLACED_SHEDDING_SETTINGS
    }


def test_interpolation_uses_environment_and_defaults() -> None:
    """`${VAR}` reads the environment, `${VAR:-x}` falls back to x, and `:-` alone means empty."""
    text = MINIMAL + "server:\n  port: ${PORT:-9090}\n  admin_token: ${TOKEN:-}\n"
    assert parse_config(text, {}).settings.server.port == 9090
    assert parse_config(text, {}).settings.server.admin_token is None
    settings = parse_config(text, {"PORT": "7000", "TOKEN": "admin-secret"}).settings
    assert settings.server.port == 7000
    assert settings.server.admin_token is not None


def test_missing_variable_is_an_error_at_its_path() -> None:
    """A `${VAR}` with no value and no default is reported once, where it is used."""
    text = MINIMAL.replace("http://127.0.0.1:9001", "${NODE_URL}")
    assert problems_of(text) == {"providers[0].url": "environment variable NODE_URL is not set"}


def test_five_mistakes_are_all_reported_with_their_paths() -> None:
    """Structural errors and dangling references in one file are all listed in one run."""
    text = f"""
server:
  port: not-a-port
providers:
  - name: gpu-a
    url: not a url
    models: {{llama: meta-llama/Llama-3.1-8B-Instruct}}
  - name: gpu-b
    url: http://127.0.0.1:9002
    models: {{llama: x}}
    max_concurency: 4
keys:
  - id: team-a
    key_sha256: {DIGEST}
    route: {{strategy: fixed, fixed: gpu-z}}
  - id: team-b
    key_sha256: abc
"""
    found = problems_of(text)
    assert set(found) == {
        "server.port",
        "providers[0].url",
        "providers[1].max_concurency",
        "keys[0].route.fixed",
        "keys[1].key_sha256",
    }
    assert "gpu-z" in found["keys[0].route.fixed"]


def test_problems_never_echo_secret_values() -> None:
    """A rejected secret-bearing field is reported by path, never by its value."""
    text = MINIMAL + "server:\n  admin_token: [super-secret-token]\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    assert "super-secret-token" not in str(caught.value)


@pytest.mark.parametrize("secret", ["sk-up\r\nX-Evil: 1", "sk-up\n", "sk-\x00up", "sk-\x7fup"])
def test_a_control_character_in_a_provider_api_key_is_refused_at_its_path(secret: str) -> None:
    """A line break or another control character in `api_key` (here from the environment) would
    break every request's head: check-config refuses it at its path, without quoting it."""
    text = MINIMAL.replace("    models:", "    api_key: ${UPSTREAM_KEY}\n    models:", 1)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {"UPSTREAM_KEY": secret})
    problems = {problem.path: problem.message for problem in caught.value.problems}
    assert list(problems) == ["providers[0].api_key"]
    assert "control character" in problems["providers[0].api_key"]
    assert "sk-" not in str(caught.value)


def test_an_api_key_with_a_tab_or_non_ascii_text_is_accepted() -> None:
    """Only control characters are refused: a tab or non-ASCII text may be part of a key."""
    text = MINIMAL.replace("    models:", "    api_key: ${UPSTREAM_KEY}\n    models:", 1)
    settings = parse_config(text, {"UPSTREAM_KEY": "sk-\tkey-é"}).settings
    assert settings.providers[0].api_key is not None


def test_a_tls_ca_file_that_is_missing_or_not_pem_is_an_error_at_its_path(
    tmp_path: Path,
) -> None:
    """`tls_ca_file` is read by check-config: a missing file or one with no PEM certificate is
    an error at its path, not a failure at the first request."""
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    for path, words in ((tmp_path / "missing.pem", "does not exist"), (not_pem, "no usable PEM")):
        text = MINIMAL.replace("    models:", f"    tls_ca_file: {path}\n    models:", 1)
        problems = problems_of(text)
        assert list(problems) == ["providers[0].tls_ca_file"]
        assert words in problems["providers[0].tls_ca_file"]


def test_missing_preference_group_is_a_warning_not_an_error() -> None:
    """A model-group preference naming an unknown group is skipped with a warning."""
    text = MINIMAL + "    model_group_preferences: {llama: no-such-group}\n"
    loaded = parse_config(text, {})
    assert [warning.path for warning in loaded.warnings] == [
        "keys[0].model_group_preferences.llama"
    ]


def test_plain_key_is_hashed_at_load() -> None:
    """A `key:` given in plain text is reduced to the same digest `hash-key` prints."""
    text = MINIMAL.replace(f"key_sha256: {DIGEST}", "key: ${TEAM_KEY}")
    settings = parse_config(text, {"TEAM_KEY": "sk-test"}).settings
    assert settings.keys[0].digest == DIGEST


def test_key_needs_exactly_one_secret() -> None:
    """A key with both or neither of `key` and `key_sha256` is rejected."""
    both = MINIMAL + "    key: sk-other\n"
    assert "keys[0]" in problems_of(both)


def test_duplicate_names_and_unknown_references_are_errors() -> None:
    """Duplicate provider names, unknown group members and unknown key models are reported."""
    text = (
        MINIMAL
        + """
  - id: team-b
    key_sha256: {digest}
    models: [nope]
groups:
  lane: [gpu-q]
""".format(digest=hash_key("other"))
    )
    text = text.replace(
        "keys:",
        """  - name: gpu-a
    url: http://127.0.0.1:9003
    models: {llama: x}
keys:""",
    )
    found = problems_of(text)
    assert "providers[0].name" in found
    assert "providers[1].name" in found
    assert "groups.lane[0]" in found
    assert "keys[1].models[0]" in found


def test_auto_model_problems_are_reported_under_the_org() -> None:
    """Bad auto-model slugs and targets are config errors at the org's path."""
    text = (
        MINIMAL
        + """
orgs:
  - name: acme
    auto_model:
      enabled: true
      fallback_model: llama
      routes: {"Bad Slug": llama, code: auto}
"""
    )
    found = problems_of(text)
    assert any(path.startswith("orgs[0].auto_model") for path in found)


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the real `gateway` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_lists_every_problem_and_fails(tmp_path: Path) -> None:
    """`gateway check-config` exits non-zero and prints each problem with its path."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        MINIMAL.replace("http://127.0.0.1:9001", "nope")
        + "    route: {strategy: group, group: ghost}\n"
        + "server:\n  admin_token: [hunter2-secret]\n",
        encoding="utf-8",
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    assert "providers[0].url" in result.stderr
    assert "keys[0].route.group" in result.stderr
    assert "server.admin_token" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    """`gateway check-config` exits 0 on a valid file."""
    path = tmp_path / "good.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_hash_key_prints_sha256_of_stdin() -> None:
    """`gateway hash-key` prints the SHA-256 of the key read on stdin, ignoring the newline."""
    result = run_cli("hash-key", stdin="sk-test\n")
    assert result.returncode == 0
    assert result.stdout.strip() == DIGEST
