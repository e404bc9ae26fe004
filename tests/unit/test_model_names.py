"""Model ids in raw JSON answers: the upstream id renamed in answers and streams split anywhere."""

from __future__ import annotations

import orjson
import pytest

from gateway.edge.model_names import AnswerRenamer, ModelRenamer

UPSTREAM = "meta-llama/Llama-3.1-8B-Instruct"
PUBLIC = "llama-3.1-8b"


def test_a_whole_answer_names_the_public_model() -> None:
    """The `model` member names the public model; other text is untouched."""
    body = orjson.dumps({"model": UPSTREAM, "note": f"{UPSTREAM} is mentioned in text"})
    renamed = orjson.loads(ModelRenamer(UPSTREAM, PUBLIC).whole(body))
    assert renamed == {"model": PUBLIC, "note": f"{UPSTREAM} is mentioned in text"}


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 33, 1000])
def test_a_stream_split_anywhere_is_renamed_exactly(size: int) -> None:
    """However the stream is cut into chunks, the result equals renaming it whole."""
    event = b"data: " + orjson.dumps({"model": UPSTREAM, "choices": []}) + b"\n\n"
    stream = event * 5 + b"data: [DONE]\n\n"
    renamer = ModelRenamer(UPSTREAM, PUBLIC)
    pieces = [renamer.feed(stream[start : start + size]) for start in range(0, len(stream), size)]
    out = b"".join(pieces) + renamer.flush()
    assert out == stream.replace(orjson.dumps(UPSTREAM), orjson.dumps(PUBLIC))


def test_a_stream_chunk_ending_an_event_is_passed_on_at_once() -> None:
    """Nothing is held back at an event boundary, so tokens are never delayed."""
    renamer = ModelRenamer(UPSTREAM, PUBLIC)
    event = b"data: " + orjson.dumps({"model": UPSTREAM}) + b"\n\n"
    assert renamer.feed(event) == event.replace(orjson.dumps(UPSTREAM), orjson.dumps(PUBLIC))


def test_an_answer_without_a_requested_model_is_renamed_by_its_own_model() -> None:
    """A stored response fetched by id names the public model its upstream id stands for."""
    renamer = AnswerRenamer({UPSTREAM: PUBLIC}, keeps=lambda model: False)
    body = orjson.dumps({"id": "resp_1", "model": UPSTREAM})
    assert orjson.loads(renamer.whole(body))["model"] == PUBLIC
    keeping = AnswerRenamer({UPSTREAM: PUBLIC}, keeps=lambda model: True)
    assert keeping.whole(body) == body


def test_a_stream_without_a_requested_model_is_renamed_by_its_first_event() -> None:
    """A stored response replayed as a stream names the public model in every event."""
    renamer = AnswerRenamer({UPSTREAM: PUBLIC}, keeps=lambda model: False)
    first = b"data: " + orjson.dumps({"response": {"model": UPSTREAM}}) + b"\n\n"
    later = b"data: " + orjson.dumps({"response": {"model": UPSTREAM}, "n": 2}) + b"\n\n"
    out = renamer.feed(first) + renamer.feed(later) + renamer.flush()
    assert orjson.dumps(UPSTREAM) not in out
    assert out.count(orjson.dumps(PUBLIC)) == 2


def _chat_with_text(text: str) -> bytes:
    """A chat answer whose generated content (and a tool call's arguments) is `text`."""
    arguments = orjson.dumps({"model": text}).decode()
    message = {"content": text, "tool_calls": [{"function": {"arguments": arguments}}]}
    return orjson.dumps(
        {"model": UPSTREAM, "choices": [{"message": message}], 'say "model': UPSTREAM}
    )


def test_generated_text_equal_to_the_upstream_id_is_never_renamed() -> None:
    """Only `model` members are renamed: content, tool arguments and other keys whose value is
    the upstream id keep it."""
    body = _chat_with_text(UPSTREAM)
    renamed = orjson.loads(ModelRenamer(UPSTREAM, PUBLIC).whole(body))
    assert renamed == {**orjson.loads(body), "model": PUBLIC}


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 33, 1000])
def test_a_stream_of_generated_ids_split_anywhere_renames_only_model_members(size: int) -> None:
    """However the stream is cut, each chunk's `model` is renamed and its content is not."""
    event = b"data: " + _chat_with_text(UPSTREAM) + b"\n\n"
    pretty = b'data: {"model" :\n "%s", "content": "%s"}\n\n' % (
        UPSTREAM.encode(),
        UPSTREAM.encode(),
    )
    stream = (event + pretty) * 3 + b"data: [DONE]\n\n"
    renamer = ModelRenamer(UPSTREAM, PUBLIC)
    pieces = [renamer.feed(stream[start : start + size]) for start in range(0, len(stream), size)]
    out = b"".join(pieces) + renamer.flush()
    whole = ModelRenamer(UPSTREAM, PUBLIC).whole(stream)
    assert out == whole
    assert whole.count(orjson.dumps(PUBLIC)) == 6
    assert whole.count(UPSTREAM.encode()) == 12


def test_error_bodies_rename_the_upstream_id_where_it_stands_as_a_name() -> None:
    """An error message quoting the upstream id names the public model; a longer name that
    merely starts with it does not change."""
    body = orjson.dumps(
        {
            "message": f"The model `{UPSTREAM}` does not exist. Try {UPSTREAM}.",
            "other": f"{UPSTREAM}-v2 and {UPSTREAM}.gguf",
        }
    )
    renamed = orjson.loads(ModelRenamer(UPSTREAM, PUBLIC).error(body))
    assert renamed == {
        "message": f"The model `{PUBLIC}` does not exist. Try {PUBLIC}.",
        "other": f"{UPSTREAM}-v2 and {UPSTREAM}.gguf",
    }
    stored = AnswerRenamer({UPSTREAM: PUBLIC}, keeps=lambda model: False)
    assert orjson.loads(stored.error(body)) == renamed
