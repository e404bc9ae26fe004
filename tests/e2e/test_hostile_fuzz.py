"""The API contract, fuzzed: schemathesis cases from the served OpenAPI document against a real
worker in front of a simulator find no 5xx and no off-contract answer, and leave RSS bounded.

Why every 5xx counts as a failure: an upstream's 5xx never reaches the client (the gateway fails
over, then answers 502 itself), so any 5xx here is the gateway's own; and with a healthy
simulator behind it, not even 502 to 504 has a legitimate cause.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.launcher import GatewayProcess, SimulatorProcess
from tests.support.gateway import OTHER_KEY, TEST_KEY, TEST_MODEL, chat_body, settings_dict
from tests.support.postgres import PostgresForTests, run_in_fresh_loop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FUZZ_CASES = 400
WARM_UP_REQUESTS = 100
# What the worker may grow by over the whole run: allocator and cache noise, not the cases.
RSS_GROWTH_LIMIT = 48 * 1024 * 1024
START_TIMEOUT_SECONDS = 30.0
AUTHORIZATIONS = st.sampled_from(
    [f"Bearer {TEST_KEY}", f"Bearer {TEST_KEY}", f"Bearer {OTHER_KEY}", "Bearer sk-nope", None]
)
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@dataclass(frozen=True)
class FuzzTarget:
    """The gateway under test: its URL and its worker's pid."""

    url: str
    pid: int


@pytest.fixture(scope="module")
def fuzz_target(
    postgres_for_tests: PostgresForTests, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzTarget]:
    """One simulator process and one single-worker gateway process for the module."""
    directory = tmp_path_factory.mktemp("fuzz")
    database_url = run_in_fresh_loop(postgres_for_tests.create_database())
    simulator = SimulatorProcess("node-a", log=directory / "simulator.log")
    gateway: GatewayProcess | None = None
    try:
        run_in_fresh_loop(simulator.start())
        config = settings_dict({"node-a": simulator.url}, extra={"database": {"url": database_url}})
        gateway = GatewayProcess(config, directory)
        gateway.start()
        wait_for_health(gateway.url)
        assert gateway.process is not None
        yield FuzzTarget(url=gateway.url, pid=gateway.process.pid)
    finally:
        if gateway is not None:
            gateway.stop()
        run_in_fresh_loop(simulator.terminate())
        run_in_fresh_loop(postgres_for_tests.drop_database(database_url))


def wait_for_health(url: str) -> None:
    """Return once /healthz answers 200 (bounded poll)."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError("the gateway never answered /healthz")


def bounded(body: Any) -> Any:
    """The body with generated token budgets capped, so the simulator's answers stay small."""
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                body[field] = min(value, 16)
    return body


def test_the_fuzzed_contract_holds_with_no_5xx_and_bounded_rss(fuzz_target: FuzzTarget) -> None:
    """400 positive and negative cases over every operation: no 5xx, every answer of a status,
    content type, headers and schema the spec documents, every gateway error OpenAI-shaped; the
    worker is alive afterwards and its RSS grew by less than 48 MiB."""
    worker = psutil.Process(fuzz_target.pid)
    session = requests.Session()
    for _ in range(WARM_UP_REQUESTS):
        warm = session.post(
            fuzz_target.url + "/v1/chat/completions",
            data=orjson.dumps(chat_body(max_tokens=4)),
            headers={"Authorization": f"Bearer {TEST_KEY}"},
            timeout=10,
        )
        assert warm.status_code == 200
    rss_before = worker.memory_info().rss

    schema = schemathesis.openapi.from_url(fuzz_target.url + "/openapi.json")
    cases = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(
        GenerationMode.NEGATIVE
    )
    statuses: collections.Counter[int] = collections.Counter()

    @settings(
        max_examples=FUZZ_CASES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases, authorization=AUTHORIZATIONS, known_model=st.booleans())
    def one_case(
        case: schemathesis.Case[Any], authorization: str | None, known_model: bool
    ) -> None:
        if known_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = TEST_MODEL
        case.body = bounded(case.body)
        headers = {"Authorization": authorization} if authorization else {}
        response = case.call(base_url=fuzz_target.url, session=session, headers=headers, timeout=30)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text[:500]
        if response.status_code >= 400 and "x-gateway-provider" not in response.headers:
            error = response.json()["error"]
            assert error["message"]
            assert error["type"]
            assert error["code"]
        case.validate_response(response, checks=CHECKS)

    one_case()

    assert worker.is_running()
    assert worker.status() != psutil.STATUS_ZOMBIE
    assert requests.get(fuzz_target.url + "/healthz", timeout=5).status_code == 200
    rss_after = worker.memory_info().rss
    print(
        f"fuzz: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}, "
        f"worker RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    assert sum(statuses.values()) >= FUZZ_CASES / 2
    assert statuses[200] >= FUZZ_CASES / 20, "too few cases reached the upstream"
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
