"""The reference backend served on port 0, driven with httpx and the official openai client."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from backends.reference import config
from tests.integration.conftest import serve_reference

CHAT = "/v1/chat/completions"


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _events(body: str) -> list[dict | str]:
    """The data of each SSE event: parsed JSON, or the literal [DONE]."""
    events = []
    for block in body.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def _stats(http: httpx.AsyncClient) -> dict:
    response = await http.get("/_stats")
    assert response.status_code == 200
    return response.json()


async def test_health_and_models(http, oai):
    assert (await http.get("/health")).json() == {"status": "ok"}
    models = await oai.models.list()
    assert [m.id for m in models.data] == ["ref-chat", "ref-chat-large", "ref-instruct", "ref-image", "ref-video", "ref-tts", "ref-stt"]
    assert all(m.owned_by == "reference" and m.object == "model" for m in models.data)


async def test_unary_chat_follows_the_token_rule_and_is_deterministic(oai):
    messages = [{"role": "system", "content": "Be brief."}, *_user("Say something nice")]
    first = await oai.chat.completions.create(model="any-model", messages=messages)
    again = await oai.chat.completions.create(model="any-model", messages=messages)
    assert first.object == "chat.completion" and first.model == "any-model"
    [choice] = first.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert len(choice.message.content.split()) == 16  # the default length
    assert first.usage.prompt_tokens == (2 + 3) + 4 * 2 + 3
    assert first.usage.completion_tokens == 16 and first.usage.total_tokens == 16 + 16
    assert again.choices[0].message.content == choice.message.content
    assert again.id != first.id


async def test_unary_completion_with_max_tokens_and_stop(oai, http):
    capped = await oai.completions.create(model="ref-instruct", prompt="one two [[tokens=9]]",
                                          max_tokens=4)
    assert capped.object == "text_completion"
    assert capped.choices[0].finish_reason == "length"
    assert len(capped.choices[0].text.split()) == 4
    assert capped.usage.prompt_tokens == 3 + 1 and capped.usage.completion_tokens == 4
    full = (await http.post("/v1/completions", json={
        "model": "ref-instruct", "prompt": "one two [[tokens=9]]"})).json()
    stop = full["choices"][0]["text"].split()[3]
    stopped = await oai.completions.create(model="ref-instruct", prompt="one two [[tokens=9]]",
                                           stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full["choices"][0]["text"][:full["choices"][0]["text"].index(stop)]


async def test_streamed_chat_sends_one_token_per_chunk_and_final_usage(oai):
    messages = _user("tell me [[tokens=12]]")
    unary = await oai.chat.completions.create(model="ref-chat", messages=messages)
    stream = await oai.chat.completions.create(model="ref-chat", messages=messages, stream=True,
                                               stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 12
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content) == unary.choices[0].message.content
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert usage.usage.prompt_tokens == unary.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_without_usage_ends_with_done(http):
    response = await http.post(CHAT, json={"model": "m", "messages": _user("[[tokens=3]]"),
                                           "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    assert len(events) == 3 + 1 + 1  # tokens, the finish chunk, [DONE]
    assert all("usage" not in e for e in events[:-1])


async def test_continuous_usage_stats_puts_running_usage_on_every_chunk(http):
    response = await http.post(CHAT, json={
        "model": "m", "messages": _user("count [[tokens=5]]"), "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = _events(response.text)
    assert events.pop() == "[DONE]"
    prompt_tokens = 2 + 4 + 3
    running = [e["usage"]["completion_tokens"] for e in events]
    assert running == [1, 2, 3, 4, 5, 5, 5]  # 5 tokens, the finish chunk, the usage chunk
    assert all(e["usage"]["prompt_tokens"] == prompt_tokens for e in events)
    assert all(e["usage"]["total_tokens"] == prompt_tokens + e["usage"]["completion_tokens"]
               for e in events)


async def test_n_2_gives_two_different_choices_and_sums_tokens(oai, http):
    chat = await oai.chat.completions.create(model="m", messages=_user("[[tokens=6]]"), n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content
    assert chat.usage.completion_tokens == 12
    response = await http.post(CHAT, json={"model": "m", "messages": _user("[[tokens=6]]"),
                                           "n": 2, "stream": True,
                                           "stream_options": {"include_usage": True}})
    events = _events(response.text)
    streamed = {0: "", 1: ""}
    for event in events[:-2]:
        for choice in event["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content", "")
    assert [streamed[0], streamed[1]] == [c.message.content for c in chat.choices]
    assert events[-2]["usage"]["completion_tokens"] == 12


async def test_per_token_delay_applies_to_unary_calls(http):
    started_s = time.monotonic()
    response = await http.post(CHAT, json={"model": "m",
                                           "messages": _user("[[tokens=6]] [[delay_ms=30]]")})
    assert response.status_code == 200
    assert time.monotonic() - started_s >= 5 * 0.030


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"[" * 200_000, None),
    ({"messages": _user("hi")}, "model"),
    ({"model": "", "messages": _user("hi")}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"content": "hi"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": "m", "messages": _user("hi"), "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": _user("hi"), "max_completion_tokens": "5"},
     "max_completion_tokens"),
    ({"model": "m", "messages": _user("hi"), "n": 9}, "n"),
    ({"model": "m", "messages": _user("hi"), "n": True}, "n"),
    ({"model": "m", "messages": _user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": _user("hi"), "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": _user("hi"), "stream": "yes"}, "stream"),
    ({"model": "m", "messages": _user("hi"), "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "m", "messages": _user("[[tokens=100001]]")}, "messages"),
])
async def test_bad_chat_input_is_a_400_in_openai_shape(http, body, param):
    if isinstance(body, bytes):
        response = await http.post(CHAT, content=body,
                                   headers={"Content-Type": "application/json"})
    else:
        response = await http.post(CHAT, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize("body", [
    {"model": "m"},
    {"model": "m", "prompt": 5},
    {"model": "m", "prompt": []},
    {"model": "m", "prompt": ["ok", 3]},
    {"model": "m", "prompt": "hi", "max_tokens": -1},
])
async def test_bad_completion_input_is_a_400(http, body):
    response = await http.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_openai_client_sees_bad_request_error(oai):
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model="m", messages=_user("hi"), n=20)


async def test_body_over_1_mib_is_a_413(http):
    big = {"model": "m", "messages": _user("x " * (600 * 1024))}
    response = await http.post(CHAT, json=big)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_api_key_is_required_when_configured():
    async with serve_reference(config.Settings(port=0, api_key="sk-right")) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            body = {"model": "m", "messages": _user("hi")}
            assert (await http.post(CHAT, json=body)).status_code == 401
            wrong = await http.post(CHAT, json=body, headers={"Authorization": "Bearer sk-wrong"})
            assert wrong.status_code == 401
            assert wrong.json()["error"]["code"] == "invalid_api_key"
            assert (await http.get("/v1/models")).status_code == 401
            assert (await http.get("/health")).status_code == 200
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-wrong",
                                      max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model="m", messages=_user("hi"))
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-right",
                                      max_retries=0) as good:
            reply = await good.chat.completions.create(model="m", messages=_user("hi"))
            assert reply.usage.completion_tokens == 16


async def test_client_leaving_a_slow_stream_stops_generation(base_url, http):
    body = {"model": "m", "messages": _user("[[tokens=1000]] [[delay_ms=5]]"), "stream": True}
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as leaver:
        async with leaver.stream("POST", CHAT, json=body) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
    left_s = time.monotonic()
    while (await _stats(http))["streams_cancelled"] < 1:
        assert time.monotonic() - left_s < 0.2, "the server did not notice the client leaving"
        await asyncio.sleep(0.01)
    before = await _stats(http)
    await asyncio.sleep(0.1)  # 20 token periods: generation would show here
    after = await _stats(http)
    assert after["tokens_generated"] == before["tokens_generated"] < 100
    assert after["streams_started"] == 1 and after["streams_completed"] == 0
    assert after["streams_cancelled"] == 1


async def test_stats_count_every_token_produced(http):
    await http.post(CHAT, json={"model": "m", "messages": _user("[[tokens=7]]"), "n": 3})
    await http.post("/v1/completions", json={"model": "m", "prompt": ["[[tokens=2]]", "x"],
                                             "stream": True})
    stats = await _stats(http)
    assert stats["requests"] == 2
    assert stats["tokens_generated"] == 7 * 3 + 2 + 16
    assert stats["streams_started"] == stats["streams_completed"] == 1
