"""docs/openapi.yaml: valid OpenAPI 3, OpenAI-shaped on every error, and in step with the app."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import schemathesis
from schemathesis.core.result import Err

from gateway.app import create_app
from gateway.edge.openapi import load_spec
from gateway.shared.errors import ERROR_TYPES
from tests.support.gateway import build_settings

METHODS = ("get", "post", "put", "patch", "delete")
ERROR_SCHEMAS = {"#/components/schemas/Error", "#/components/schemas/NotReady"}
# Routes that are not part of the client-facing API.
OPERATOR_PATHS = ("/metrics", "/admin/")


def resolve(spec: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local `$ref` (one level is all the spec uses for responses)."""
    reference = node.get("$ref")
    if reference is None:
        return node
    target: Any = spec
    for part in reference.removeprefix("#/").split("/"):
        target = target[part]
    resolved: Mapping[str, Any] = target
    return resolved


def operations(spec: Mapping[str, Any]) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """(method, path, operation) for every operation in the spec."""
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def test_the_spec_is_valid_openapi_3() -> None:
    """The document passes the OpenAPI 3.0 meta-schema and has every operation loadable."""
    schema = schemathesis.openapi.from_dict(load_spec())
    schema.validate()
    results = list(schema.get_all_operations())
    failures = [str(result.err()) for result in results if isinstance(result, Err)]
    assert failures == []
    assert len(results) == len(list(operations(load_spec())))


def test_every_error_status_is_documented_with_the_openai_error_schema() -> None:
    """Each 4xx/5xx of each operation (the upstream pass-through range aside) is OpenAI-shaped
    JSON: `{"error": {"message", "type", "code"}}`."""
    spec = load_spec()
    checked = 0
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if status[0] not in "45" or status.endswith("XX"):
                continue
            content = resolve(spec, response).get("content", {})
            schema = content.get("application/json", {}).get("schema", {})
            assert schema.get("$ref") in ERROR_SCHEMAS, f"{method} {path} {status}"
            checked += 1
    assert checked > 20
    detail = spec["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "code"}
    not_ready = spec["components"]["schemas"]["NotReady"]["allOf"]
    assert {"$ref": "#/components/schemas/Error"} in not_ready


def test_the_spec_documents_exactly_the_client_routes_of_the_app() -> None:
    """Every client-facing route the app registers is in the spec, and nothing else is."""
    app = create_app(build_settings({"node-a": "http://127.0.0.1:9"}))
    registered = {
        (route.method, path)
        for route in app.router.routes()
        if route.method != "HEAD"
        and (info := route.resource.get_info() if route.resource else {})
        # A plain route has a `path`; one with a variable (`/v1/models/{model}`) a `formatter`.
        and (path := info.get("path") or info.get("formatter"))
        and not path.startswith(OPERATOR_PATHS)
    }
    documented = {(method, path) for method, path, _ in operations(load_spec())}
    assert registered == documented


def test_every_status_the_gateway_answers_with_is_documented_on_completions() -> None:
    """Each status the gateway's errors can carry (`ERROR_TYPES`, plus the connection limits'
    431) is a documented answer of both completion endpoints."""
    spec = load_spec()
    statuses = {str(status) for status in ERROR_TYPES if status not in {405, 415}} | {"431"}
    for path in ("/v1/chat/completions", "/v1/completions"):
        documented = set(spec["paths"][path]["post"]["responses"])
        assert statuses <= documented, path
