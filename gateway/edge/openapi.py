"""The client-facing API contract, `docs/openapi.yaml`, served as JSON at `GET /openapi.json`."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

SPEC_NAME = "openapi.yaml"


def spec_file() -> Traversable:
    """The spec: packaged in an installed wheel (as `gateway/openapi.yaml`), else `docs/`."""
    packaged = resources.files("gateway") / SPEC_NAME
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "docs" / SPEC_NAME


def load_spec() -> dict[str, Any]:
    """The parsed OpenAPI document."""
    loader = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
    spec: dict[str, Any] = yaml.load(spec_file().read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a safe loader
    return spec


class OpenApiEndpoint:
    """`GET /openapi.json`: the spec as JSON, read and converted on first use, then kept."""

    def __init__(self) -> None:
        self._body: bytes | None = None

    async def serve(self, request: web.Request) -> web.Response:
        """Answer with the spec."""
        if self._body is None:
            self._body = orjson.dumps(load_spec())
        return web.Response(body=self._body, content_type="application/json")
