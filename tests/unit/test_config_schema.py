"""`gateway config-schema`: the committed docs/config.schema.json, and what it accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.cli import main as gateway_main
from gateway.operations.config_schema import config_schema

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMMITTED = PROJECT_ROOT / "docs" / "config.schema.json"
SCHEMA_LINE = "# yaml-language-server: $schema="


def validator() -> jsonschema.Draft202012Validator:
    """A validator for the committed schema."""
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def example_configs() -> dict[str, Any]:
    """The example configs in the repository, parsed (`${VAR}`s are strings, so they stay)."""
    configmap = yaml.safe_load((PROJECT_ROOT / "deploy/k8s/configmap.yaml").read_text("utf-8"))
    return {
        "deploy/gateway.yaml": yaml.safe_load(
            (PROJECT_ROOT / "deploy/gateway.yaml").read_text("utf-8")
        ),
        "deploy/k8s/configmap.yaml": yaml.safe_load(configmap["data"]["gateway.yaml"]),
    }


def test_committed_schema_is_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway config-schema` prints docs/config.schema.json exactly (regenerate when it fails)."""
    assert gateway_main(["config-schema"]) == 0
    assert capsys.readouterr().out == COMMITTED.read_text(encoding="utf-8")
    assert json.loads(COMMITTED.read_text(encoding="utf-8")) == config_schema()


def test_schema_accepts_the_example_configs() -> None:
    """Every example config in the repository is valid under the schema."""
    check = validator()
    for name, config in example_configs().items():
        errors = [error.message for error in check.iter_errors(config)]
        assert errors == [], name


def test_schema_rejects_typos_and_wrong_types_like_the_loader_does() -> None:
    """An unknown field, a wrong type and a missing provider list are schema errors too."""
    check = validator()
    config = example_configs()["deploy/gateway.yaml"]
    typo = {**config, "server": {**config["server"], "drain_delay_secnds": 5}}
    wrong = {**config, "providers": [{**config["providers"][0], "draining": "maybe"}]}
    missing = {key: value for key, value in config.items() if key != "providers"}
    for broken in (typo, wrong, missing):
        assert list(check.iter_errors(broken)), broken


def test_schema_documents_the_reload_and_drain_fields() -> None:
    """The new fields are in the schema with their defaults and descriptions of their sections."""
    schema = config_schema()
    server = schema["$defs"]["ServerSettings"]
    assert server["properties"]["drain_delay_seconds"]["default"] == 5.0
    assert "drain_delay_seconds" in server["description"]
    provider = schema["$defs"]["ProviderSettings"]
    assert provider["properties"]["draining"]["default"] is False


def test_example_configs_point_editors_at_the_schema() -> None:
    """deploy/gateway.yaml opens with the yaml-language-server line naming the committed schema."""
    first = (PROJECT_ROOT / "deploy/gateway.yaml").read_text("utf-8").splitlines()[0]
    assert first.startswith(SCHEMA_LINE)
    target = (PROJECT_ROOT / "deploy" / first.removeprefix(SCHEMA_LINE)).resolve()
    assert target == COMMITTED
    readme = (PROJECT_ROOT / "README.md").read_text("utf-8")
    assert f"{SCHEMA_LINE}docs/config.schema.json" in readme
