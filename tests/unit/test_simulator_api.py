"""The simulator's OpenAI-compatible surface, checked with the real `openai` SDK and raw HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.simulators import InProcessSimulator

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


@pytest.fixture
async def node() -> AsyncIterator[InProcessSimulator]:
    """One instant node named `node-a`."""
    async with InProcessSimulator("node-a") as simulator:
        yield simulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client."""
    async with aiohttp.ClientSession() as client:
        yield client


def sdk(node: InProcessSimulator) -> openai.AsyncOpenAI:
    """An OpenAI SDK client pointed at the node, without retries."""
    return openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)


async def sse_payloads(response: aiohttp.ClientResponse) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    body = await response.read()
    assert body.endswith(b"\n\n")
    events = body.split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") for event in events)
    return [event.removeprefix(b"data: ") for event in events]


async def test_sdk_parses_a_chat_completion_with_usage(node: InProcessSimulator) -> None:
    """A non-streamed chat answer has the model asked for, max_tokens words and usage."""
    async with sdk(node) as client:
        completion = await client.chat.completions.create(
            model="any-model", messages=MESSAGES, max_tokens=5
        )
    assert completion.object == "chat.completion"
    assert completion.model == "any-model"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert choice.message.content.split()[0] == "node-a"
    assert len(choice.message.content.split()) == 5
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5


async def test_sdk_parses_a_streamed_chat_with_final_usage(node: InProcessSimulator) -> None:
    """A streamed chat opens with the role, sends one token per chunk, then usage alone."""
    async with sdk(node) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [chunk.choices[0].delta.content for chunk in chunks[1:5]]
    assert "".join(content or "" for content in contents).split()[0] == "node-a"
    assert chunks[5].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_sdk_parses_a_legacy_completion(node: InProcessSimulator) -> None:
    """The legacy endpoint answers a text prompt with a `text_completion`."""
    async with sdk(node) as client:
        completion = await client.completions.create(model="m", prompt="Once upon", max_tokens=3)
    assert completion.object == "text_completion"
    assert len(completion.choices[0].text.split()) == 3
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3


async def test_sdk_parses_a_streamed_legacy_completion(node: InProcessSimulator) -> None:
    """A streamed legacy completion carries text pieces and ends with a finish reason."""
    async with sdk(node) as client:
        stream = await client.completions.create(model="m", prompt="Once", stream=True)
        chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].text for chunk in chunks)
    assert len(text.split()) == 16
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_batch_of_legacy_prompts_gets_one_choice_each(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """A list of prompts is answered with one choice per prompt, usage summed."""
    payload = {"model": "m", "prompt": ["aaaa", "bbbbbbbb"], "max_tokens": 2}
    async with session.post(f"{node.url}/v1/completions", json=payload) as response:
        body = await response.json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 3
    assert body["usage"]["completion_tokens"] == 4


async def test_stream_without_usage_option_has_no_usage_field(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """Without `include_usage`, chunks carry no `usage` key and the stream ends with [DONE]."""
    payload = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 2}
    async with session.post(f"{node.url}/v1/chat/completions", json=payload) as response:
        assert response.content_type == "text/event-stream"
        payloads = await sse_payloads(response)
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(payload) for payload in payloads[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1


async def test_output_is_deterministic_per_node_and_request_number(
    session: aiohttp.ClientSession,
) -> None:
    """Two fresh nodes of the same name give the same text for the same request number."""
    texts = []
    for _ in range(2):
        async with (
            InProcessSimulator("twin") as twin,
            session.post(
                f"{twin.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES}
            ) as response,
        ):
            texts.append((await response.json())["choices"][0]["message"]["content"])
    assert texts[0] == texts[1]
    assert len(texts[0].split()) == 16


async def test_every_response_names_the_node(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """Completions, models, metrics and unknown paths all carry `x-simulator-node`."""
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/nowhere")]:
        async with session.request(method, node.url + path) as response:
            assert response.headers["x-simulator-node"] == "node-a"


async def test_models_lists_configured_models_and_rejects_others(
    session: aiohttp.ClientSession,
) -> None:
    """With a model list the node lists exactly those and answers 404 for any other model."""
    async with InProcessSimulator("n", models=["llama", "qwen"]) as node:
        async with session.get(f"{node.url}/v1/models") as response:
            listed = [model["id"] for model in (await response.json())["data"]]
        payload = {"model": "gpt-4", "messages": MESSAGES}
        async with session.post(f"{node.url}/v1/chat/completions", json=payload) as response:
            status, error = response.status, (await response.json())["error"]
    assert listed == ["llama", "qwen"]
    assert status == 404
    assert error["code"] == "model_not_found"


async def test_any_model_node_lists_the_models_it_was_asked_for(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """Without a model list, `/v1/models` shows the models requested so far."""
    async with sdk(node) as client:
        await client.chat.completions.create(model="first", messages=MESSAGES, max_tokens=1)
        models = await client.models.list()
    assert [model.id for model in models.data] == ["first"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"messages": []}', "model"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max"),
    ],
)
async def test_invalid_requests_get_an_openai_shaped_400(
    node: InProcessSimulator, session: aiohttp.ClientSession, body: bytes, fragment: str
) -> None:
    """Malformed bodies are answered 400 with an OpenAI error object naming the problem."""
    async with session.post(f"{node.url}/v1/chat/completions", data=body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]
