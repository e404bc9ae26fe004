"""The gateway's upstream client against aiohttp's, case by case over one corpus of upstream
behaviours (tests/support/upstream_corpus.py): the same outcome, or the reason the table gives."""

from __future__ import annotations

import ssl
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import uvloop

from tests.support.raw_upstream import self_signed, server_tls
from tests.support.upstream_corpus import (
    CORPUS,
    UpstreamCase,
    run_case,
    through_aiohttp,
    through_gateway_client,
)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate's server context, and a client context that trusts it."""
    cert, key = self_signed(Path(tmp_path_factory.mktemp("tls")))
    return server_tls(cert, key), ssl.create_default_context(cafile=str(cert))


def test_every_difference_from_aiohttp_is_explained() -> None:
    """A case where the two clients are expected to differ says why; names are unique."""
    assert len({case.name for case in CORPUS}) == len(CORPUS)
    for case in CORPUS:
        assert (case.aiohttp is None) == (not case.why), case.name


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
async def test_the_gateway_client_gives_the_expected_outcome(
    case: UpstreamCase,
    exit_stack: AsyncExitStack,
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The gateway's client makes of each upstream behaviour what the table says, and no
    request reaches the upstream more often than sent."""
    outcomes, server = await run_case(case, through_gateway_client, case.ours, exit_stack, tls_pair)
    assert tuple(outcomes) == case.ours
    if case.requests_seen is not None:
        assert len(server.requests) == case.requests_seen


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
async def test_aiohttp_gives_the_outcome_the_table_says(
    case: UpstreamCase,
    exit_stack: AsyncExitStack,
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """aiohttp's `ClientSession` makes of each behaviour the same as the gateway's client, or
    what the table records with its reason."""
    outcomes, _ = await run_case(case, through_aiohttp, case.aiohttp_outcomes, exit_stack, tls_pair)
    assert tuple(outcomes) == case.aiohttp_outcomes


def test_the_gateway_client_gives_the_same_outcomes_on_uvloop(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """`gateway serve` runs on uvloop, whose transports differ from asyncio's (how a close, a
    reset and a failed write are reported): every case gives the table's outcome there too."""

    async def every_case() -> dict[str, tuple[str, ...]]:
        mismatches = {}
        for case in CORPUS:
            async with AsyncExitStack() as stack:
                outcomes, server = await run_case(
                    case, through_gateway_client, case.ours, stack, tls_pair
                )
                seen = len(server.requests)
                if tuple(outcomes) != case.ours or case.requests_seen not in (None, seen):
                    mismatches[case.name] = (*outcomes, f"{seen} seen")
        return mismatches

    assert uvloop.run(every_case()) == {}
