"""The reference backend's test-only modes: a backend that lies (TOKENS_BACKEND_MISBEHAVE)
and the recording of what it received (TOKENS_BACKEND_RECORD_REQUESTS)."""
import json

import httpx
import pytest

from backends.reference import config
from tests.integration.conftest import serve_reference

CHAT = "/v1/chat/completions"


@pytest.fixture
async def liar():
    settings = config.Settings(port=0, misbehave=True, record_requests=3)
    async with serve_reference(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield client


def chat(content: str, **fields) -> dict:
    return {"model": "ref-chat", "messages": [{"role": "user", "content": content}], **fields}


async def events(client: httpx.AsyncClient, body: dict, count: int) -> list[str]:
    """The first `count` SSE blocks of a stream (comments included), then the client leaves."""
    out = []
    async with client.stream("POST", CHAT, json=body) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line:
                out.append(line)
            if len(out) == count:
                break
    return out


async def test_directives_are_plain_text_unless_the_mode_is_on(http):
    body = chat("[[ignore_max_tokens]] [[usage=1,100000]] [[tokens=20]]", max_tokens=3)
    reply = (await http.post(CHAT, json=body)).json()
    assert reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["finish_reason"] == "length"
    assert (await http.get("/_requests")).status_code == 404
    forever = await http.post(CHAT, json=chat("[[forever=text]]", max_tokens=2, stream=True))
    assert forever.status_code == 200 and forever.text.endswith("data: [DONE]\n\n")


async def test_it_ignores_max_tokens_and_reports_the_usage_it_is_told(liar):
    reply = (await liar.post(CHAT, json=chat("[[ignore_max_tokens]] [[tokens=40]] [[usage=7,100000]]",
                                             max_tokens=5, max_completion_tokens=5))).json()
    assert len(reply["choices"][0]["message"]["content"].split()) == 40
    assert reply["usage"] == {"prompt_tokens": 7, "completion_tokens": 100000, "total_tokens": 100007}
    body = chat("[[tokens=6]] [[usage=3,9]]", stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True})
    blocks = await events(liar, body, 100)
    usages = [json.loads(b[6:])["usage"] for b in blocks if b.startswith("data: {")]
    assert usages and all(u == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12} for u in usages)


@pytest.mark.parametrize("kind", ["text", "empty", "keepalive"])
async def test_a_stream_can_go_on_forever(liar, kind):
    blocks = await events(liar, chat(f"[[forever={kind}]]", max_tokens=3, stream=True), 30)
    assert len(blocks) == 30 and "data: [DONE]" not in blocks
    data = [json.loads(b[6:]) for b in blocks if b.startswith("data: {")]
    if kind == "keepalive":
        assert blocks[1:] == [": keep-alive"] * 29  # after the role chunk, nothing but comments
    elif kind == "empty":
        assert all(d["choices"][0]["delta"] == {} and d["choices"][0]["finish_reason"] is None for d in data[1:])
    else:
        words = [d["choices"][0]["delta"].get("content") for d in data]
        assert sum(1 for w in words if w) == 30 > 3, "words past max_tokens"
    reply = await liar.post(CHAT, json=chat("[[forever=text]]"))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"


async def test_it_returns_more_images_than_asked(liar):
    reply = (await liar.post("/v1/images/generations", json={"prompt": "a cat [[images=11]]", "n": 1,
                                                             "size": "256x256"})).json()
    assert len(reply["data"]) == 11


async def test_it_records_what_it_received_the_latest_few(liar):
    for i in range(4):
        await liar.post(CHAT, json=chat(f"call {i}", max_tokens=2),
                        headers={"x-request-id": f"r{i}", "authorization": "Bearer secret"})
    recorded = (await liar.get("/_requests")).json()["data"]
    assert [r["body"]["messages"][0]["content"] for r in recorded] == ["call 1", "call 2", "call 3"]
    assert recorded[-1]["path"] == CHAT and recorded[-1]["body"]["max_tokens"] == 2
    assert recorded[-1]["headers"]["x-request-id"] == "r3" and "authorization" not in recorded[-1]["headers"]
    await liar.delete("/_requests")
    assert (await liar.get("/_requests")).json()["data"] == []
