"""OpenAI's Responses API (POST /v1/responses), driven by the `openai` package against a real server on loopback:
each response is the chat reply to the same conversation (the oracle is the chat route, itself checked against
the model elsewhere), in the Responses shape, streamed or not alike."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.openai_server import KEY_A, KEY_B, TASK
from tests.test_openai_compat import WEATHER

# The chat API's tool, as the Responses API writes it (flat).
WEATHER_TOOL = {"type": "function", **WEATHER["function"], "strict": True}
QUESTION = "What is the weather in Paris?"


def chat(oai: openai.OpenAI, messages: list[dict[str, Any]], **fields: Any) -> Any:
    return oai.chat.completions.create(model=TASK, messages=messages, temperature=0, **fields)


def test_a_response_is_the_chat_reply_to_the_same_conversation(oai: openai.OpenAI) -> None:
    got = oai.responses.create(
        model=TASK,
        input="Hello there",
        instructions="Be brief.",
        max_output_tokens=8,
        temperature=0,
        store=False,
        include=["reasoning.encrypted_content"],  # what a stateless client asks for: nothing to include here
    )
    want = chat(
        oai, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], max_tokens=8
    )
    assert got.object == "response" and got.id.startswith("resp_") and got.model == TASK
    assert got.output_text == want.choices[0].message.content and got.output_text
    assert got.usage is not None and want.usage is not None
    assert (got.usage.input_tokens, got.usage.output_tokens) == (want.usage.prompt_tokens, want.usage.completion_tokens)
    cut = want.choices[0].finish_reason == "length"
    assert got.status == ("incomplete" if cut else "completed")
    assert (got.incomplete_details is not None and got.incomplete_details.reason == "max_output_tokens") == cut
    (item,) = got.output
    assert item.type == "message" and item.role == "assistant" and item.status == got.status
    cut_short = oai.responses.create(model=TASK, input="Tell me a story", max_output_tokens=2, temperature=0)
    assert cut_short.status == cut_short.output[-1].status == "incomplete"  # the message max_output_tokens cut


def test_streamed_events_add_up_to_the_response(oai: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": TASK, "input": "Tell me a story", "max_output_tokens": 12, "temperature": 0}
    whole = oai.responses.create(**request)
    events = list(oai.responses.create(**request, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.incomplete" if whole.status == "incomplete" else "response.completed")
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    done = events[-1].response
    assert done.output_text == whole.output_text and whole.usage is not None
    assert done.output[-1].status == whole.output[-1].status == whole.status  # incomplete where cut
    item_done = [e.item for e in events if e.type == "response.output_item.done"]
    assert item_done[-1].status == whole.status
    assert (done.usage.input_tokens, done.usage.output_tokens) == (whole.usage.input_tokens, whole.usage.output_tokens)
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done"):
        assert kinds.count(kind) == 1, kind


def test_a_named_tool_choice_gives_a_function_call_item(oai: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": TASK,
        "input": QUESTION,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 40,
        "temperature": 0,
    }
    got = oai.responses.create(**request)
    named = {"type": "function", "function": {"name": "get_weather"}}
    want = chat(oai, [{"role": "user", "content": QUESTION}], tools=[WEATHER], tool_choice=named, max_tokens=40)
    (call,) = got.output
    (wanted,) = want.choices[0].message.tool_calls or []
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.arguments == wanted.function.arguments and json.loads(call.arguments)["city"] in (
        "Paris",
        "Rome",
        "Oslo",
    )
    events = list(oai.responses.create(**request, stream=True))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert len(added) == 1 and added[0].type == "function_call" and added[0].name == "get_weather"
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == call.arguments  # the arguments stream piece by piece
    assert events[-1].response.output[0].arguments == call.arguments


def test_earlier_calls_and_their_outputs_are_part_of_the_conversation(oai: openai.OpenAI) -> None:
    """A function_call item and its function_call_output read as the chat's assistant tool call and tool message."""
    arguments = '{"city": "Paris", "unit": "celsius"}'
    items: list[dict[str, Any]] = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": arguments},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees, sunny"},
    ]
    got = oai.responses.create(
        model=TASK, input=items, tools=[WEATHER_TOOL], tool_choice="none", max_output_tokens=8, temperature=0
    )
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    want = chat(oai, messages, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert got.output_text == want.choices[0].message.content
    assert got.usage is not None and want.usage is not None and got.usage.input_tokens == want.usage.prompt_tokens
    # Output items sent back as the openai package gives them (ids, statuses, output_text parts) read the same.
    again = oai.responses.create(
        model=TASK, input=[*items, *[o.model_dump() for o in got.output]], max_output_tokens=4, temperature=0
    )
    assert again.status in ("completed", "incomplete")


def test_text_format_holds_the_reply_to_a_schema(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"]}
    fmt = {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}
    got = oai.responses.create(
        model=TASK, input="Pick a colour.", text={"format": fmt}, max_output_tokens=20, temperature=0
    )
    assert json.loads(got.output_text)["colour"] in ("red", "blue")


def test_tools_beside_a_text_format_and_auto_without_tools(oai: openai.OpenAI) -> None:
    """Tools and text.format go together (an agent with tools and an output type sends both), as on the chat
    route; tool_choice 'auto' is the Responses API's default, so it is accepted without tools, and reported."""
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"]}
    fmt = {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}
    now = {"type": "function", "name": "now"}  # no parameters
    forced = oai.responses.create(
        model=TASK,
        input="Pick a colour.",
        text={"format": fmt},
        tools=[now],
        tool_choice="required",
        max_output_tokens=20,
        temperature=0,
    )
    (call,) = [item for item in forced.output if item.type == "function_call"]
    assert call.name == "now" and json.loads(call.arguments) == {}
    plain = oai.responses.create(
        model=TASK,
        input="Pick a colour.",
        text={"format": fmt},
        tool_choice="auto",
        max_output_tokens=20,
        temperature=0,
    )
    assert json.loads(plain.output_text)["colour"] in ("red", "blue")
    assert plain.tool_choice == "auto" and plain.tools == []
    # max_tool_calls bounds built-in tools' calls, of which there are none here: taken, and nothing changes.
    bounded = oai.responses.create(
        model=TASK, input="Pick a colour.", text={"format": fmt}, max_tool_calls=1, max_output_tokens=20, temperature=0
    )
    assert bounded.output_text == plain.output_text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"conversation": "conv_1"}, 400, "conversation"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input.0.type"),
        ({"input": [{"role": "robot", "content": "hi"}]}, 400, "input.0.role"),
        ({"input": [{"type": ["message"], "content": "hi"}]}, 400, "input.0.type"),  # was a 500 (schemathesis)
        ({"include": ["message.output_text.logprobs"]}, 400, "include.0"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"prompt": {"id": "pmpt_1"}}, 400, "prompt"),
        ({"truncation": "auto"}, 400, "truncation"),
        ({"model": "no-such-task"}, 404, "model"),
        ({"input": "word " * 300}, 400, "input"),  # past the server's prompt limit (200), found after reading
        # Checked as the chat request a Responses request becomes, named as the client sent them (they were
        # max_completion_tokens and response_format).
        ({"max_output_tokens": 5000}, 400, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format"),
    ],
)
def test_what_cannot_be_done_is_refused_by_name(server_url: str, body: dict[str, Any], status: int, param: str) -> None:
    r = httpx.post(
        f"{server_url}/v1/responses",
        json={"model": TASK, "input": "hi", "max_output_tokens": 2, **body},
        headers={"authorization": f"Bearer {KEY_A}"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    if param in ("top_logprobs", "prompt", "truncation"):  # OpenAI documents them: not supported, not unknown
        assert r.json()["error"]["code"] == "unsupported_parameter", r.text
    message = r.json()["error"]["message"]
    assert not any(chat in message for chat in ("max_completion_tokens", "response_format", "json_schema.schema"))


def test_a_stored_response_is_continued_read_and_deleted(oai: openai.OpenAI, server_url: str) -> None:
    """previous_response_id continues a stored response: the same as sending its conversation whole; GET returns
    it as it was, DELETE drops it; store false keeps nothing; another tenant never sees it."""
    first = oai.responses.create(model=TASK, input="My name is Ada.", max_output_tokens=4, temperature=0)
    assert first.store is True
    second = oai.responses.create(
        model=TASK, previous_response_id=first.id, input="What is my name?", max_output_tokens=6, temperature=0
    )
    whole = [
        {"role": "user", "content": "My name is Ada."},
        *[item.model_dump() for item in first.output],
        {"role": "user", "content": "What is my name?"},
    ]
    want = oai.responses.create(model=TASK, input=whole, max_output_tokens=6, temperature=0, store=False)
    assert second.output_text == want.output_text and second.previous_response_id == first.id
    assert second.usage is not None and want.usage is not None
    assert second.usage.input_tokens == want.usage.input_tokens
    got = oai.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    with (
        openai.OpenAI(base_url=f"{server_url}/v1", api_key=KEY_B, max_retries=0) as other,
        pytest.raises(openai.NotFoundError),
    ):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(want.id)  # store false
    assert oai.responses.delete(first.id) is None  # the SDK returns nothing for a delete
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model=TASK, previous_response_id=first.id, input="Again?", max_output_tokens=2)


def test_a_streamed_response_is_stored_once_complete(oai: openai.OpenAI) -> None:
    events = list(
        oai.responses.create(model=TASK, input="Count to three.", max_output_tokens=6, temperature=0, stream=True)
    )
    done = events[-1].response
    assert oai.responses.retrieve(done.id).output_text == done.output_text


def test_the_store_keeps_the_most_recently_used() -> None:
    from server.api.response_store import MemoryResponseStore, StoredResponse

    store = MemoryResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put("t", name, StoredResponse([], {"id": name}))
    assert store.get("t", "a") is not None  # now the most recently used
    store.put("t", "c", StoredResponse([], {"id": "c"}))
    assert store.get("t", "b") is None and store.get("t", "a") is not None and len(store) == 2
    assert store.get("other", "a") is None and store.delete("t", "a") and not store.delete("t", "a")


def test_each_tenant_keeps_its_own_responses_within_its_bytes() -> None:
    """One tenant's flood of responses pushes out only its own (it evicted everyone's past a shared count), and a
    tenant's responses are bounded in bytes, as all tenants' are together."""
    from server.api.response_store import MemoryResponseStore, StoredResponse

    def response(i: int, size: int = 100) -> StoredResponse:
        return StoredResponse([{"role": "user", "content": "x" * size}], {"id": f"r{i}"})

    store = MemoryResponseStore(capacity=3, tenant_bytes=1000, total_bytes=2500)
    store.put("bob", "mine", response(0))
    for i in range(10):
        store.put("alice", f"a{i}", response(i))
    assert store.get("bob", "mine") is not None and len(store) == 4  # alice keeps her newest 3
    for i in range(3):
        store.put("alice", f"big{i}", response(i, size=400))  # ~450 bytes each: two fit in 1,000
    assert store.get("alice", "big0") is None and store.get("alice", "big2") is not None
    assert store.bytes_of("alice") <= 1000 and store.get("bob", "mine") is not None
    store.put("alice", "huge", response(0, size=5000))  # over a tenant's budget alone: not kept
    assert store.get("alice", "huge") is None and store.get("alice", "big2") is not None
    for tenant in ("carol", "dave"):
        for i in range(2):
            store.put(tenant, f"c{i}", response(i, size=400))
    assert sum(store.bytes_of(t) for t in ("alice", "bob", "carol", "dave")) <= 2500


def test_stored_input_items_keep_only_what_is_read(oai: openai.OpenAI, server_url: str) -> None:
    """Keys of an input item that nothing reads are not kept with the response (megabytes of them were)."""
    first = oai.responses.create(
        model=TASK,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi", "junk": "x" * 1000}], "junk": "y"}],
        max_output_tokens=2,
        temperature=0,
    )
    (item,) = oai.responses.input_items.list(first.id)
    assert set(item.model_dump(exclude_none=True)) == {"type", "id", "role", "content", "status"}
    assert [part.model_dump(exclude_none=True) for part in item.content] == [{"type": "input_text", "text": "Hi"}]
    too_much = {"model": TASK, "input": "Hi", "metadata": {f"k{i}": "v" for i in range(17)}}
    r = httpx.post(f"{server_url}/v1/responses", json=too_much, headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata", r.text


def test_input_items_list_what_a_stored_response_read(oai: openai.OpenAI, server_url: str) -> None:
    """GET /v1/responses/{id}/input_items (the SDK's responses.input_items.list): the conversation a response
    read, the earlier response's included, each item with an id, newest first by default, paged by limit/after."""
    first = oai.responses.create(model=TASK, input="My name is Ada.", max_output_tokens=3, temperature=0)
    second = oai.responses.create(
        model=TASK, previous_response_id=first.id, input="What is my name?", max_output_tokens=3, temperature=0
    )
    oldest_first = list(oai.responses.input_items.list(second.id, order="asc"))
    assert [(item.type, item.role) for item in oldest_first] == [
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert [part.text for item in oldest_first for part in item.content] == [
        "My name is Ada.",
        first.output_text,
        "What is my name?",
    ]
    assert oldest_first[1].id == first.output[0].id and all(item.id for item in oldest_first)
    assert [i.id for i in oai.responses.input_items.list(first.id)] == [oldest_first[0].id]  # the first read one

    headers = {"authorization": f"Bearer {KEY_A}"}
    url = f"{server_url}/v1/responses/{second.id}/input_items"
    page = httpx.get(url, params={"limit": 2}, headers=headers).json()  # newest first
    assert [i["id"] for i in page["data"]] == [oldest_first[2].id, oldest_first[1].id] and page["has_more"]
    assert (page["first_id"], page["last_id"]) == (oldest_first[2].id, oldest_first[1].id)
    rest = httpx.get(url, params={"limit": 2, "after": page["last_id"]}, headers=headers).json()
    assert [i["id"] for i in rest["data"]] == [oldest_first[0].id] and not rest["has_more"]
    for params, param in [({"after": "msg_nope"}, "after"), ({"limit": 0}, "limit"), ({"include": "x"}, "include.0")]:
        bad = httpx.get(url, params=params, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    with pytest.raises(openai.NotFoundError):
        oai.responses.input_items.list("resp_" + "0" * 24)


def test_an_item_reference_stands_for_the_stored_item(oai: openai.OpenAI, server_url: str) -> None:
    """{"type": "item_reference", "id": ...} (clients that keep their history as ids send it) reads as the stored
    item itself: the reply equals sending the items whole. Unknown ids, another tenant's, and an item already in the
    conversation are refused by position."""
    first = oai.responses.create(model=TASK, input="My name is Ada.", max_output_tokens=4, temperature=0)
    (asked,) = oai.responses.input_items.list(first.id)
    question = {"role": "user", "content": "What is my name?"}
    refs = [{"type": "item_reference", "id": asked.id}, {"type": "item_reference", "id": first.output[0].id}]
    by_reference = oai.responses.create(
        model=TASK, input=[*refs, question], max_output_tokens=6, temperature=0, store=False
    )
    whole = [{"role": "user", "content": "My name is Ada."}, *[i.model_dump() for i in first.output], question]
    want = oai.responses.create(model=TASK, input=whole, max_output_tokens=6, temperature=0, store=False)
    assert by_reference.output_text == want.output_text
    assert by_reference.usage is not None and want.usage is not None
    assert by_reference.usage.input_tokens == want.usage.input_tokens

    def refused(key: str, body: dict[str, Any]) -> str:
        r = httpx.post(f"{server_url}/v1/responses", json=body, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 400, r.text
        return r.json()["error"]["param"]

    unknown = {"model": TASK, "input": [question, {"type": "item_reference", "id": "msg_nope"}]}
    assert refused(KEY_A, unknown) == "input.1.id"
    assert refused(KEY_B, {**unknown, "input": refs}) == "input.0.id"  # another tenant's items are unknown to B
    again = {"model": TASK, "previous_response_id": first.id, "input": [refs[1]]}
    assert refused(KEY_A, again) == f"input.{len(whole) - 1}.id"  # already in the continued conversation
    odd_id = {"model": TASK, "max_output_tokens": 2, "input": [{"role": "user", "content": "Hi", "id": [1]}, refs[0]]}
    r = httpx.post(f"{server_url}/v1/responses", json=odd_id, headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200, r.text  # a list as an item's id names nothing (it was a set member: a 500)
