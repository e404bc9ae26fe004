"""Conformance: the same client calls (OpenAI SDK sync and async, raw HTTP) directly against a
simulator node and through the gateway give the same answers, except for the documented
differences (the key, `x-gateway-*` headers, the public model name)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.conformance import Target, comparable, raw_call, sse_payloads
from tests.support.gateway import OTHER_KEY, TEST_KEY, TEST_MODEL, UPSTREAM_MODEL, build_settings
from tests.support.simulators import InProcessSimulator

Targets = tuple[Target, Target, InProcessSimulator]
MESSAGES: list[Any] = [{"role": "user", "content": "Say something about caches."}]

# Every JSON endpoint of the table, called raw: path and body for a model name.
RAW_CASES: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "chat": ("/v1/chat/completions", lambda m: {"model": m, "messages": MESSAGES}),
    "completions": ("/v1/completions", lambda m: {"model": m, "prompt": "Once upon"}),
    "embeddings": ("/v1/embeddings", lambda m: {"model": m, "input": ["a b", "c"]}),
    "rerank": (
        "/v1/rerank",
        lambda m: {"model": m, "query": "red fox", "documents": ["a red fox", "blue sky"]},
    ),
    "score": ("/v1/score", lambda m: {"model": m, "text_1": "red fox", "text_2": ["fox", "x"]}),
    "tokenize": ("/tokenize", lambda m: {"model": m, "prompt": "three little words"}),
    "detokenize": ("/detokenize", lambda m: {"model": m, "tokens": [1, 2, 3]}),
    "responses": ("/v1/responses", lambda m: {"model": m, "input": "Hello there"}),
}


@pytest.fixture
async def targets(start_simulator: SimulatorFactory, start_gateway: GatewayFactory) -> Targets:
    """One node serving the upstream model id, and a gateway mapping the public name to it (the
    first of its `models` section, so the default of a body without `model`)."""
    node = await start_simulator("node-a", models=[UPSTREAM_MODEL])
    settings = build_settings({"node-a": node.url}, extra={"models": [{"name": TEST_MODEL}]})
    server = await start_gateway(settings)
    direct = Target("direct", node.url, UPSTREAM_MODEL, "unused-by-the-node")
    gateway = Target("gateway", str(server.make_url("")).rstrip("/"), TEST_MODEL, TEST_KEY)
    return direct, gateway, node


@pytest.mark.parametrize("case", sorted(RAW_CASES))
async def test_raw_http_answers_match_for_every_json_endpoint(targets: Targets, case: str) -> None:
    """Each JSON endpoint answers the same status, content type and body through the gateway,
    which names the public model and adds its own request id."""
    direct, gateway, node = targets
    path, body_for = RAW_CASES[case]
    answers = {}
    for target in (direct, gateway):
        await node.reset(clear_cache=True)  # both calls meet the same prefix cache
        status, headers, body = await raw_call(
            target, "POST", path, body=orjson.dumps(body_for(target.model))
        )
        answers[target.name] = (
            status,
            headers["Content-Type"],
            comparable(orjson.loads(body), target.model),
        )
        if target is gateway:
            assert headers["x-request-id"] != headers["x-upstream-request-id"]
            assert UPSTREAM_MODEL.encode() not in body
    assert answers["direct"][0] == 200
    assert answers["direct"] == answers["gateway"]


async def test_raw_http_streams_match_and_every_chunk_names_the_public_model(
    targets: Targets,
) -> None:
    """A streamed chat gives the same events through the gateway; each chunk carries the public
    model name, and the stream has the gateway's `x-request-id` and the upstream's id apart."""
    direct, gateway, node = targets
    events = {}
    for target in (direct, gateway):
        await node.reset(clear_cache=True)
        body = {"model": target.model, "messages": MESSAGES, "stream": True, "max_tokens": 6}
        status, headers, answer = await raw_call(
            target,
            "POST",
            "/v1/chat/completions",
            body=orjson.dumps(body),
            headers={"x-request-id": "client-chosen-id"},
        )
        assert status == 200
        payloads = sse_payloads(answer)
        events[target.name] = comparable(payloads, target.model)
        if target is gateway:
            assert headers["x-request-id"] == "client-chosen-id"
            assert headers["x-upstream-request-id"].startswith("node-a-")
            assert all(chunk["model"] == TEST_MODEL for chunk in payloads[:-1])
    assert events["direct"] == events["gateway"]


async def test_async_sdk_answers_match(targets: Targets) -> None:
    """The async SDK's chat, stream, completion, embeddings, model and Responses calls parse to
    the same objects both ways."""
    results: dict[str, list[Any]] = {}
    for target in targets[:2]:
        await targets[2].reset(clear_cache=True)
        async with openai.AsyncOpenAI(
            base_url=target.base_url, api_key=target.api_key, max_retries=0
        ) as client:
            chat = await client.chat.completions.create(model=target.model, messages=MESSAGES)
            stream = await client.chat.completions.create(
                model=target.model, messages=MESSAGES, stream=True, max_tokens=4
            )
            chunks = [chunk.model_dump() async for chunk in stream]
            legacy = await client.completions.create(model=target.model, prompt="Once")
            vectors = await client.embeddings.create(model=target.model, input=["a", "b c"])
            retrieved = await client.models.retrieve(target.model)
            response = await client.responses.create(model=target.model, input="Hi")
            again = await client.responses.retrieve(response.id)
            follow = await client.responses.create(
                model=target.model, input="More", previous_response_id=response.id
            )
            deleted = await client.responses.with_raw_response.delete(follow.id)
        assert again.id == response.id
        assert follow.previous_response_id == response.id
        assert orjson.loads(deleted.content) == {
            "id": follow.id,
            "object": "response",
            "deleted": True,
        }
        results[target.name] = [
            comparable(item, target.model)
            for item in (
                chat.model_dump(),
                chunks,
                legacy.model_dump(),
                vectors.model_dump(),
                {"id": retrieved.id == target.model, "object": retrieved.object},
                response.model_dump(),
                again.model_dump(),
                follow.model_dump(),
            )
        ]
    for left, right in zip(results["direct"], results["gateway"], strict=True):
        assert left == right


async def test_sync_sdk_answers_match(targets: Targets) -> None:
    """The blocking SDK (in a thread, so the in-process servers keep serving) sees the same."""

    def calls(target: Target) -> list[Any]:
        with openai.OpenAI(
            base_url=target.base_url, api_key=target.api_key, max_retries=0
        ) as client:
            chat = client.chat.completions.create(model=target.model, messages=MESSAGES)
            vectors = client.embeddings.create(model=target.model, input="one two")
            response = client.responses.create(model=target.model, input="Hi", stream=True)
            events = [event.type for event in response]
            transcript = client.audio.transcriptions.create(
                model=target.model, file=("clip.wav", b"RIFF" + b"\0" * 4000)
            )
        return [
            comparable(item, target.model)
            for item in (chat.model_dump(), vectors.model_dump(), events, transcript.model_dump())
        ]

    direct, gateway, node = targets
    await node.reset(clear_cache=True)
    through_node = await asyncio.to_thread(calls, direct)
    await node.reset(clear_cache=True)
    assert through_node == await asyncio.to_thread(calls, gateway)


async def test_models_retrieve_through_the_gateway_names_the_public_model(
    targets: Targets,
) -> None:
    """`GET /v1/models/{id}` answers the public name for a model the key may use, 404 else."""
    _, gateway, _ = targets
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=TEST_KEY) as client:
        assert (await client.models.retrieve(TEST_MODEL)).id == TEST_MODEL
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(UPSTREAM_MODEL)


async def test_a_mapped_model_id_changes_no_other_byte_of_the_request(targets: Targets) -> None:
    """A 2^64 seed, odd spacing and key order reach the node exactly: only the model id is
    spliced in (no re-serialising, no float coercion)."""
    _, gateway, node = targets
    template = (
        '{ "seed" : 18446744073709551616, "model":"%s",\n'
        '  "messages": [{"role":"user","content":"caf\\u00e9 \\"q\\""}], "zeta": 1.50 }'
    )
    sent = (template % TEST_MODEL).encode()
    status, _, _ = await raw_call(gateway, "POST", "/v1/chat/completions", body=sent)
    assert status == 200
    assert (await node.stats()).last_request().body == (template % UPSTREAM_MODEL).encode()


async def test_multipart_model_is_spliced_and_the_file_passes_unchanged(targets: Targets) -> None:
    """A transcription form reaches the node with only its model field mapped."""
    _, gateway, node = targets
    form = aiohttp.FormData()
    form.add_field("file", b"\x00\x01" * 5000, filename="a.wav", content_type="audio/wav")
    form.add_field("model", TEST_MODEL)
    status, _, body = await raw_call(gateway, "POST", "/v1/audio/transcriptions", body=form)
    assert status == 200
    assert orjson.loads(body)["text"].startswith("10000 bytes")
    seen = orjson.loads((await node.stats()).last_request().body)
    assert seen == {"model": UPSTREAM_MODEL, "file_bytes": 10000}


async def test_keep_upstream_model_ids_passes_answers_unchanged(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With `keep_upstream_model_ids`, answers name the upstream id as the node sent it."""
    node = await start_simulator("node-a")
    settings = build_settings(
        {"node-a": node.url},
        extra={"models": [{"name": TEST_MODEL, "keep_upstream_model_ids": True}]},
    )
    server = await start_gateway(settings)
    gateway = Target("gateway", str(server.make_url("")).rstrip("/"), TEST_MODEL, TEST_KEY)
    body = orjson.dumps({"model": TEST_MODEL, "messages": MESSAGES})
    _, _, answer = await raw_call(gateway, "POST", "/v1/chat/completions", body=body)
    assert orjson.loads(answer)["model"] == UPSTREAM_MODEL


async def test_a_stored_response_is_reachable_only_with_the_key_that_created_it(
    targets: Targets,
) -> None:
    """Another key gets a 404 `response_not_found` for the id, and the node is not asked."""
    _, gateway, node = targets
    status, _, body = await raw_call(
        gateway, "POST", "/v1/responses", body=orjson.dumps({"model": TEST_MODEL, "input": "Hi"})
    )
    assert status == 200
    response_id = orjson.loads(body)["id"]
    await node.reset()
    stranger = Target("gateway", gateway.root, TEST_MODEL, OTHER_KEY)
    for method in ("GET", "DELETE"):
        status, _, body = await raw_call(stranger, method, f"/v1/responses/{response_id}")
        assert status == 404
        assert orjson.loads(body)["error"]["code"] == "response_not_found"
    assert (await node.stats()).requests_received == 0
    status, _, _ = await raw_call(gateway, "GET", f"/v1/responses/{response_id}")
    assert status == 200


async def test_a_stored_response_replayed_as_a_stream_matches(targets: Targets) -> None:
    """`GET /v1/responses/{id}?stream=true` gives the same events both ways, each naming the
    public model through the gateway."""
    events = {}
    for target in targets[:2]:
        body = orjson.dumps({"model": target.model, "input": "Hi"})
        _, _, created = await raw_call(target, "POST", "/v1/responses", body=body)
        response_id = orjson.loads(created)["id"]
        status, headers, answer = await raw_call(
            target, "GET", f"/v1/responses/{response_id}?stream=true"
        )
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        events[target.name] = comparable(sse_payloads(answer), target.model)
    assert events["direct"] == events["gateway"]


def _transcription_form(model: str, *, stream: bool) -> aiohttp.FormData:
    """A form in curl's order: the file first, then the model, then `stream` after both."""
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF" + b"\x07" * 30000, filename="clip.wav", content_type="audio/wav")
    form.add_field("model", model)
    if stream:
        form.add_field("stream", "true")
    return form


async def test_sdk_transcriptions_match_streamed_and_not(targets: Targets) -> None:
    """The async SDK's transcription, plain and with `stream=True`, gives the same transcript and
    the same events directly and through the gateway."""
    direct, gateway, node = targets
    results: dict[str, list[Any]] = {}
    for target in (direct, gateway):
        await node.reset(clear_cache=True)
        async with openai.AsyncOpenAI(
            base_url=target.base_url, api_key=target.api_key, max_retries=0
        ) as client:
            clip = ("clip.wav", b"RIFF" + b"\x01" * 12000)
            whole = await client.audio.transcriptions.create(model=target.model, file=clip)
            stream = await client.audio.transcriptions.create(
                model=target.model, file=clip, stream=True
            )
            events = [event.model_dump() async for event in stream]
        results[target.name] = [whole.model_dump(), events]
    assert results["direct"][0]["text"] == "12004 bytes of audio transcribed by node-a"
    assert [event["type"] for event in results["direct"][1]][-1] == "transcript.text.done"
    assert len(results["direct"][1]) > 2
    assert results["direct"] == results["gateway"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_raw_transcriptions_match_with_stream_after_the_file(
    targets: Targets, stream: bool
) -> None:
    """A curl-ordered form (file, model, then `stream`) answers the same status, content type and
    body through the gateway: JSON, or the same `transcript.text.*` events and `[DONE]`."""
    direct, gateway, node = targets
    answers = {}
    for target in (direct, gateway):
        await node.reset(clear_cache=True)
        form = _transcription_form(target.model, stream=stream)
        status, headers, body = await raw_call(
            target, "POST", "/v1/audio/transcriptions", body=form
        )
        content = sse_payloads(body) if stream else orjson.loads(body)
        answers[target.name] = (status, headers["Content-Type"].split(";")[0], content)
        if target is gateway:
            assert headers["x-upstream-request-id"].startswith("node-a-")
            assert orjson.loads((await node.stats()).last_request().body)["model"] == UPSTREAM_MODEL
    kind = "text/event-stream" if stream else "application/json"
    assert answers["direct"][:2] == (200, kind)
    if stream:
        events = answers["direct"][2]
        assert events[-1] == "[DONE]"
        assert events[-2] == {
            "type": "transcript.text.done",
            "text": "30004 bytes of audio transcribed by node-a",
        }
    assert answers["direct"] == answers["gateway"]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_a_non_finite_sampling_parameter_gets_the_nodes_own_400(
    targets: Targets, constant: str
) -> None:
    """`NaN` or `Infinity` in a sampling parameter (JSON as Python reads it, as vLLM does) reaches
    the node, whose 400 with its parameter message the client gets byte for byte."""
    answers = []
    for target in targets[:2]:
        body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "top_p": %s}'
        sent = body % (target.model.encode(), constant.encode())
        status, _, answer = await raw_call(target, "POST", "/v1/chat/completions", body=sent)
        answers.append((status, answer))
    assert answers[0][0] == 400
    error = orjson.loads(answers[0][1])["error"]
    assert error["message"].startswith("top_p must be a finite number, got ")
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "top_p", 400)
    assert answers[0] == answers[1]


async def test_a_malformed_body_is_still_the_gateways_400(targets: Targets) -> None:
    """What no JSON parser accepts (a trailing comma, a lowercase `nan`) is refused at the
    gateway as invalid JSON and never reaches the node."""
    _, gateway, node = targets
    await node.reset()
    for sent in (b'{"model": "m", "messages": [],}', b'{"model": "m", "temperature": nan}'):
        status, _, answer = await raw_call(gateway, "POST", "/v1/chat/completions", body=sent)
        assert status == 400
        assert orjson.loads(answer)["error"]["code"] == "invalid_json"
    assert (await node.stats()).completion_requests == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [("/tokenize", {"prompt": "three little words"}), ("/detokenize", {"tokens": [1, 2, 3]})],
)
async def test_tokenize_and_detokenize_without_a_model_answer_as_the_node_does(
    targets: Targets, path: str, body: dict[str, Any]
) -> None:
    """A body without `model` is answered 200 as vLLM answers it (its default model): the
    gateway sends it to the key's default model, spliced in as its upstream id."""
    direct, gateway, node = targets
    answers = []
    for target in (direct, gateway):
        status, headers, answer = await raw_call(target, "POST", path, body=orjson.dumps(body))
        answers.append((status, headers["Content-Type"], orjson.loads(answer)))
    assert answers[0][0] == 200
    assert answers[0] == answers[1]
    assert orjson.loads((await node.stats()).last_request().body) == {
        **body,
        "model": UPSTREAM_MODEL,
    }


async def test_models_carry_the_nodes_context_length_root_and_parent(targets: Targets) -> None:
    """`GET /v1/models` (and one model) through the gateway carries the node's `max_model_len`
    and vLLM's `root` and `parent` fields, for the public name, as the node lists them; the
    node's list is fetched once for both calls (kept a while)."""
    direct, gateway, node = targets
    await node.reset()
    entries = {}
    for target in (direct, gateway):
        status, _, body = await raw_call(target, "GET", "/v1/models")
        assert status == 200
        listed = {entry["id"]: entry for entry in orjson.loads(body)["data"]}
        status, _, one = await raw_call(target, "GET", f"/v1/models/{target.model}")
        assert status == 200
        assert orjson.loads(one) == {
            **listed[target.model],
            "created": orjson.loads(one)["created"],
        }
        entry = listed[target.model]
        entries[target.name] = {
            field: comparable(entry[field], target.model)
            for field in ("id", "object", "root", "parent", "max_model_len")
        }
    assert entries["direct"]["max_model_len"] == 8192
    assert entries["direct"] == entries["gateway"]
    assert (await node.stats()).requests_by_path["/v1/models"] == 2  # direct once, gateway once


async def test_an_unknown_model_is_a_404_naming_the_model_parameter(targets: Targets) -> None:
    """The gateway's own 404 for a model it does not serve names `param: "model"`, as vLLM's
    does (what SDK users key on)."""
    _, gateway, _ = targets
    body = orjson.dumps({"model": "nope", "messages": MESSAGES})
    status, _, answer = await raw_call(gateway, "POST", "/v1/chat/completions", body=body)
    assert status == 404
    assert orjson.loads(answer)["error"]["param"] == "model"


async def test_the_sdks_responses_stream_helper_reads_the_stream_both_ways(
    targets: Targets,
) -> None:
    """`client.responses.stream()` (which builds the response from `output_item.added`,
    `content_part.added`, the deltas and the `*.done` events, in vLLM's order) gives the same
    events, text and final response directly and through the gateway."""
    results = {}
    for target in targets[:2]:
        await targets[2].reset(clear_cache=True)
        async with (
            openai.AsyncOpenAI(
                base_url=target.base_url, api_key=target.api_key, max_retries=0
            ) as client,
            client.responses.stream(model=target.model, input="Hello there") as stream,
        ):
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        results[target.name] = (
            kinds,
            final.output_text.rsplit(" ", 1)[0],  # its last word numbers the node's responses
            final.model == target.model,
            comparable(final.model_dump(), target.model),
        )
    kinds = results["direct"][0]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert results["direct"][1]
    assert results["direct"][2]
    assert results["direct"] == results["gateway"]


async def test_an_empty_messages_array_is_the_nodes_to_judge(targets: Targets) -> None:
    """`messages: []` (with `NaN` too, as vLLM is asked it) reaches the node, whose answer the
    client gets as directly: the gateway checks only the shape routing needs."""
    for extra in (b"", b', "temperature": NaN'):
        answers = []
        for target in targets[:2]:
            sent = b'{"model": "%s", "messages": []%s}' % (target.model.encode(), extra)
            status, _, answer = await raw_call(target, "POST", "/v1/chat/completions", body=sent)
            answers.append((status, answer))
        assert answers[0][0] == 400
        assert answers[0] == answers[1]
