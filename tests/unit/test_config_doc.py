"""`gateway config-doc`: the committed docs/configuration.md, generated from the config models."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main as gateway_main
from gateway.config import Settings
from gateway.config_base import Section
from gateway.operations.config_doc import config_doc

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMMITTED = PROJECT_ROOT / "docs" / "configuration.md"


def sections() -> list[tuple[str, type[Section]]]:
    """Every config section model with its path in the file (`keys[].route`), from Settings."""
    found: list[tuple[str, type[Section]]] = []
    pending: list[tuple[str, type[Section]]] = [("", Settings)]
    while pending:
        path, model = pending.pop()
        found.append((path, model))
        for name, field in model.model_fields.items():
            for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, Section):
                    repeated = getattr(field.annotation, "__origin__", None) is list
                    child = f"{path}.{name}" if path else name
                    pending.append((child + ("[]" if repeated else ""), candidate))
    return found


def test_committed_reference_is_what_the_command_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`gateway config-doc` prints docs/configuration.md exactly (regenerate when it fails)."""
    assert gateway_main(["config-doc"]) == 0
    assert capsys.readouterr().out == COMMITTED.read_text(encoding="utf-8")
    assert config_doc() == COMMITTED.read_text(encoding="utf-8")


def test_reference_has_every_field_with_its_description() -> None:
    """Each section has a heading, and each of its fields a row carrying its docstring."""
    doc = config_doc()
    for path, model in sections():
        heading = f"## `{path}`\n" if path else "## Top level\n"
        assert heading in doc, path
        table = doc.split(heading, 1)[1].split("\n## ", 1)[0]
        for name, field in model.model_fields.items():
            assert f"| `{name}` |" in table, f"{path}.{name}"
            assert field.description, f"{path}.{name} has no docstring to document it"
            first_words = " ".join(field.description.split()[:4])
            assert first_words in table, f"{path}.{name}"


def test_reference_shows_defaults_and_bounds_as_yaml_spells_them() -> None:
    """Defaults read as YAML (`5`, `false`, factories' values) and bounds in words."""
    doc = config_doc()
    assert "| `drain_delay_seconds` | number ≥ 0 | `5` |" in doc
    assert "| `request_compression` | boolean | `false` |" in doc
    assert '`{"build": "code", "plan": "architect"}`' in doc
    assert "| `scope` | key \\| conversation | `key` |" in doc
    assert "| `name` | name | required |" in doc
