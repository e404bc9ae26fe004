"""Usage rollups against a real vLLM node: over a mixed run through a 2-worker `gateway serve`
(chat and legacy completions, whole and streamed, with and without `include_usage`, some
streams cut by the client), the rollups' token sums equal vLLM's own
`vllm:prompt_tokens_total` and `vllm:generation_tokens_total` deltas, exactly where a number
can be exact.

What vLLM counts of an aborted request (vLLM 0.32, `vllm/v1/metrics/stats.py`): its prompt
tokens once its prefill produced a first token, and every token the engine generated until the
abort reached it. The client cuts each stream after its first content chunk, so the prompt was
counted. A cut stream whose usage event reached the gateway before it saw the client go counts
whole; the others count no tokens (outcome `cancelled`): the gateway never saw a figure. So the
prompt delta is exact (the rollups' plus those streams' prompts, known from the same prompt
answered whole). How many tokens the engine made before the abort arrived is known to nobody
outside it (measured: 19 to 3,022 over 4 cut streams of `max_tokens` 1,500, the tiny model
being fast): the generation delta is only bounded, by one token per such stream and their
`max_tokens`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from affinity_store.postgres import create_pool
from affinity_store.usage import PostgresUsageStore, Tokens, UsageKey
from bench.launcher import GatewayProcess
from gateway.config_fleet import hash_key
from tests.support.gateway import TEST_KEY, TEST_MODEL, answers, settings_dict
from tests.support.polling import wait_until
from tests.support.vllm import START_TIMEOUT_SECONDS, VLLM_MODEL, VllmNode, prefix_cache_counters

# The first real-engine test also waits for the session's node to start.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.real_engine,
    pytest.mark.timeout(START_TIMEOUT_SECONDS + 240),
]

USAGE_KEY = "sk-usage-key-0123456789"  # team-c: only requests whose usage the client sees too
CUT_KEY = "sk-cut-key-0123456789"  # team-d: only the streams the client cuts
CUTS = 4
CUT_CONVERSATION = 1  # one of team-c's whole answers: its prompt's length is known
PROMPT, GENERATION = "vllm:prompt_tokens_total", "vllm:generation_tokens_total"
CUT_MAX_TOKENS = 1500  # far more than the engine makes before the abort reaches it


@pytest.fixture
async def gateway(
    vllm_node: VllmNode, database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """A 2-worker gateway in front of the real node, flushing its usage every half second."""
    config = settings_dict({"node-a": vllm_node.url}, upstream_model=VLLM_MODEL)
    for key_id, key in (("team-c", USAGE_KEY), ("team-d", CUT_KEY)):
        config["keys"].append({"id": key_id, "key_sha256": hash_key(key), "models": ["*"]})
    config["database"] = {"url": database_url, "pool_min_size": 1, "pool_max_size": 4}
    config["usage"] = {"flush_interval_seconds": 0.5}
    process = GatewayProcess(config, tmp_path, workers=2)
    process.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: answers(session, process.url), timeout=60, message="gateway")
        yield process
    finally:
        process.stop()


def messages(index: int) -> list[ChatCompletionMessageParam]:
    """The `index`-th conversation (a few repeat, so the node serves some prompts from cache)."""
    return [{"role": "user", "content": f"Conversation {index % 5}: say something about usage."}]


async def whole_and_reported(client: AsyncOpenAI, indexes: range) -> tuple[Tokens, dict[int, int]]:
    """Whole chat answers (odd indexes) and streams with `include_usage`: the usage the client
    was shown, and each whole answer's prompt tokens."""
    seen = Tokens()
    prompts = {}
    for index in indexes:
        if index % 2:
            answer = await client.chat.completions.create(
                model=TEST_MODEL,
                messages=messages(index),
                max_tokens=3 + index % 4,
            )
            assert answer.usage is not None
            usage = answer.usage
            prompts[index] = usage.prompt_tokens
        else:
            stream = await client.chat.completions.create(
                model=TEST_MODEL,
                messages=messages(index),
                max_tokens=3 + index % 4,
                stream=True,
                stream_options={"include_usage": True},
            )
            last = None
            async for chunk in stream:
                last = chunk
            assert last is not None
            assert last.usage is not None
            usage = last.usage
        seen += Tokens(1, usage.prompt_tokens, usage.completion_tokens)
    return seen, prompts


async def unreported(client: AsyncOpenAI, indexes: range) -> int:
    """Streams without `include_usage` (chat and legacy) and legacy whole answers; how many."""
    for index in indexes:
        if index % 3 == 0:
            await client.completions.create(
                model=TEST_MODEL, prompt=f"Usage note {index}:", max_tokens=4
            )
        elif index % 3 == 1:
            stream = await client.completions.create(
                model=TEST_MODEL, prompt=f"Usage note {index}:", max_tokens=4, stream=True
            )
            async for completion in stream:
                assert completion.usage is None  # the gateway took its usage event out
        else:
            chat = await client.chat.completions.create(
                model=TEST_MODEL,
                messages=messages(index),
                max_tokens=5,
                stream=True,
            )
            async for chunk in chat:
                assert chunk.usage is None
    return len(indexes)


async def cut_after_first_chunk(client: AsyncOpenAI, index: int) -> None:
    """A stream the client closes after its first content chunk (so the node's prefill ran)."""
    stream = await client.chat.completions.create(
        model=TEST_MODEL,
        messages=messages(index),
        max_tokens=CUT_MAX_TOKENS,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    else:
        raise AssertionError("the stream ended before its first content chunk")
    await stream.close()


async def idle_counters(url: str) -> dict[str, float]:
    """vLLM's counters once it runs and waits for nothing (an abort reached the engine)."""
    async with aiohttp.ClientSession() as session:

        async def idle() -> bool:
            counters = await prefix_cache_counters(session, url)
            return (
                counters["vllm:num_requests_running"] + counters["vllm:num_requests_waiting"] == 0
            )

        await wait_until(idle, timeout=30, message="the node idle")
        return dict(await prefix_cache_counters(session, url))


async def test_rollups_equal_what_the_real_node_counted(
    gateway: GatewayProcess, vllm_node: VllmNode, database_url: str
) -> None:
    """Per key the rollups equal the usage the client was shown; over the run, the rollups'
    prompt tokens plus the prompts of the cut streams whose usage never came equal vLLM's delta
    exactly, and its generation delta less the rollups' lies between one token per such stream
    and their `max_tokens`."""
    since = datetime.now(UTC) - timedelta(hours=1)
    before = await idle_counters(vllm_node.url)
    base = f"{gateway.url}/v1"
    async with (
        AsyncOpenAI(base_url=base, api_key=TEST_KEY, max_retries=0) as team_a,
        AsyncOpenAI(base_url=base, api_key=USAGE_KEY, max_retries=0) as team_c,
        AsyncOpenAI(base_url=base, api_key=CUT_KEY, max_retries=0) as team_d,
    ):
        shown, prompts = await whole_and_reported(team_c, range(12))
        plain = await unreported(team_a, range(9))
        for _ in range(CUTS):
            await cut_after_first_chunk(team_d, CUT_CONVERSATION)
    cut_prompt = prompts[CUT_CONVERSATION]  # the same conversation, answered whole

    pool = await create_pool(database_url, min_size=1, max_size=1, statement_cache_size=0)
    try:
        store = PostgresUsageStore(pool)
        expected_requests = shown.requests + plain + CUTS
        totals: dict[UsageKey, Tokens] = {}

        async def flushed() -> bool:
            totals.clear()
            totals.update(await store.usage_totals(since, timeout=5, by=("key", "outcome")))
            return sum(tokens.requests for tokens in totals.values()) == expected_requests

        await wait_until(flushed, timeout=30, message=f"{expected_requests} requests rolled up")
    finally:
        await pool.close()
    after = await idle_counters(vllm_node.url)

    def key_total(key: str) -> Tokens:
        return sum((t for k, t in totals.items() if k.api_key_id == key), Tokens())

    assert totals[UsageKey("team-c", "", "", "ok")] == shown
    assert (
        totals[UsageKey("team-a", "", "", "ok")].requests == key_total("team-a").requests == plain
    )
    cut = key_total("team-d")
    assert cut.requests == CUTS
    # A cut stream the node finished before the gateway saw its client go (the tiny model is
    # fast) had its usage event read: it counts whole, `max_tokens` generated (`ignore_eos`).
    # The others count no tokens: the gateway never saw a figure for them.
    reported = cut.prompt_tokens // cut_prompt
    assert cut.prompt_tokens == reported * cut_prompt
    assert cut.completion_tokens == reported * CUT_MAX_TOKENS
    assert totals.get(UsageKey("team-d", "", "", "cancelled"), Tokens()).requests >= CUTS - reported
    unreported_cuts = CUTS - reported

    rolled = sum(totals.values(), Tokens())
    assert after[PROMPT] - before[PROMPT] == rolled.prompt_tokens + unreported_cuts * cut_prompt
    cut_generated = after[GENERATION] - before[GENERATION] - rolled.completion_tokens
    assert unreported_cuts <= cut_generated <= unreported_cuts * CUT_MAX_TOKENS
