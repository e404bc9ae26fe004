"""The config file's JSON Schema, generated from the pydantic models (docs/config.schema.json)."""

from __future__ import annotations

import json
from typing import Any

from gateway.config import Settings

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_TITLE = "affinity-gateway configuration (gateway.yaml)"


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a config file, as an editor validates and completes it."""
    schema = Settings.model_json_schema(mode="validation")
    return {
        "$schema": SCHEMA_DIALECT,
        **schema,
        "title": SCHEMA_TITLE,
        "description": (
            "One YAML file, validated at load. `${VAR}` and `${VAR:-default}` are replaced from "
            "the environment before validation; `gateway check-config FILE` reports every "
            "problem with its path."
        ),
    }


def config_schema_json() -> str:
    """The schema as the committed file holds it: indented JSON with a final newline."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"
