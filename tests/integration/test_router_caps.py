"""router_svc in front of a backend that lies (the reference backend's test-only mode): the cap
always reaches the backend, nothing beyond the hold is forwarded or charged, an abandoned
non-streamed call is charged, and long streams keep (or end before) their hold."""
import asyncio
import json

import grpc
import httpx
import prometheus_client
import pytest
from aiohttp import web

from backends.reference import config as ref_config
from common import held, pricing
from tests.integration import router_rig
from tests.integration.conftest import serve_reference
from tokens.router.v1 import router_pb2

PRICES = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}


def catalog_yaml(url: str) -> str:
    return f"""models:
  - id: ref-chat
    type: text
    backends:
      - url: {url}/v1
        continuous_usage: true
    limits: {{max_output_tokens: 256}}
    pricing: {{input_per_million_tokens: "0.50", output_per_million_tokens: "1.50"}}
  - id: plain-chat
    type: text
    backends:
      - url: {url}/v1
    limits: {{max_output_tokens: 256}}
    pricing: {{input_per_million_tokens: "0.50", output_per_million_tokens: "1.50"}}
  - id: pictures
    type: image
    backends:
      - url: {url}/v1
    pricing: {{per_image: "0.04"}}
"""


@pytest.fixture
async def liar():
    settings = ref_config.Settings(port=0, misbehave=True, record_requests=50)
    async with serve_reference(settings) as url:
        yield url


@pytest.fixture
async def router(start_router, liar) -> router_rig.Router:
    return await start_router([liar], catalog_yaml(liar), call_max_s=1.5)


def holding(hold_id: str, *, input_tokens: int = 100, output_tokens: int = 256, model: str = "ref-chat",
            **units) -> tuple[tuple[str, str], ...]:
    """The headers ledger_svc's Check puts on an admitted call."""
    held_units = units or {"input_tokens": input_tokens, "output_tokens": output_tokens}
    return (("x-ts-hold", hold_id), ("x-ts-price", pricing.encode_header(PRICES)), ("x-request-id", "req-" + hold_id),
            ("x-ts-held", held.encode(model, held_units)))


def chat(content: str, model: str = "ref-chat", **fields) -> router_pb2.CreateChatCompletionRequest:
    request = router_pb2.CreateChatCompletionRequest(model=model, **fields)
    request.messages.add(role="user").content.string_value = content
    return request


async def sent(router: router_rig.Router) -> list[dict]:
    """The bodies the backend received, oldest first."""
    async with httpx.AsyncClient() as client:
        return [r["body"] for r in (await client.get(router.backend + "/_requests")).json()["data"]]


def overruns(router: router_rig.Router, unit: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(
        "router_backend_overruns_total", {"backend": router.backend + "/v1", "unit": unit}) or 0.0


def events(frames) -> list[dict | str]:
    text = b"".join(f.data for f in frames).decode()
    return [json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]" for e in text.split("\n\n") if e]


def settlement(router: router_rig.Router, hold_id: str):
    [found] = [s for s in router.ledger.settled if s.hold_id == hold_id]
    return found


async def test_the_cap_reaches_the_backend_always(router):
    await router.stub.Chat(chat("no cap"), metadata=holding("h1"))
    await router.stub.Chat(chat("two choices", n=2), metadata=holding("h2", output_tokens=2 * 256))
    await router.stub.Chat(chat("newer field", max_completion_tokens=5), metadata=holding("h3", output_tokens=5))
    await router.stub.Chat(chat("both fields", max_completion_tokens=5, max_tokens=9),
                           metadata=holding("h4", output_tokens=5))
    completion = router_pb2.CreateCompletionRequest(model="ref-chat")
    completion.prompt.string_value = "once upon"
    await router.stub.Complete(completion, metadata=holding("h5"))
    streamed = [c async for c in router.stub.StreamChat(chat("streamed"), metadata=holding("h6", output_tokens=40))]
    assert streamed
    caps = [{k: v for k, v in body.items() if k in ("max_tokens", "max_completion_tokens")}
            for body in await sent(router)]
    assert caps == [{"max_tokens": 256}, {"max_tokens": 256}, {"max_completion_tokens": 5},
                    {"max_tokens": 5, "max_completion_tokens": 5}, {"max_tokens": 256}, {"max_tokens": 40}]


async def test_a_unary_overrun_and_a_lying_usage_are_charged_at_most_the_hold(router):
    before = overruns(router, "output_tokens")
    reply = await router.stub.Chat(chat("[[ignore_max_tokens]] [[tokens=300]] tell me", max_tokens=10),
                                   metadata=holding("over", input_tokens=30, output_tokens=10))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4 + 4 + 3, 10)
    assert len(reply.choices[0].message.content.split()) == 300, "what the backend sent is passed on"
    liar = await router.stub.Chat(chat("[[usage=100000,100000]] hi", max_tokens=10),
                                  metadata=holding("lie", input_tokens=30, output_tokens=10))
    assert (liar.usage.prompt_tokens, liar.usage.completion_tokens) == (30, 10)
    assert liar.usage.cost == "0.00003"  # 30 x $0.50/M + 10 x $1.50/M
    await router.settled(2)
    assert (settlement(router, "over").units.output_tokens, settlement(router, "lie").units.input_tokens) == (10, 30)
    assert overruns(router, "output_tokens") == before + 2
    assert overruns(router, "input_tokens") >= 1


@pytest.mark.parametrize("model", ["ref-chat", "plain-chat"])
async def test_a_streamed_overrun_ends_with_length_at_the_hold_and_the_backend_is_closed(router, model):
    request = chat("[[ignore_max_tokens]] [[tokens=300]] [[delay_ms=2]] go", model=model, max_tokens=10,
                   stream=True)
    request.stream_options.include_usage = True
    got = events([f async for f in router.stub.CreateChatCompletion(request, metadata=holding(
        "s-" + model, input_tokens=30, output_tokens=10, model=model))])
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    words = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert sum(1 for w in words if w) == 10
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 10
    await router.settled(1)
    s = settlement(router, "s-" + model)
    assert (s.outcome, s.units.output_tokens) == ("completed", 10)
    await asyncio.sleep(0.1)
    stats = await router.stats()
    assert stats["streams_cancelled"] == 1 and stats["tokens_generated"] < 300


async def test_every_choice_is_cut_at_its_own_cap(router):
    request = chat("[[forever=text]]", n=2, max_tokens=4, stream=True)
    got = events([f async for f in router.stub.CreateChatCompletion(request, metadata=holding(
        "n2", output_tokens=8))])
    per_choice = {0: 0, 1: 0}
    finish = {}
    for chunk in got[:-1]:
        for choice in chunk["choices"]:
            per_choice[choice["index"]] += bool(choice["delta"].get("content"))
            finish[choice["index"]] = choice["finish_reason"] or finish.get(choice["index"])
    assert per_choice == {0: 4, 1: 4} and finish == {0: "length", 1: "length"}
    await router.settled(1)
    assert settlement(router, "n2").units.output_tokens == 8


@pytest.mark.parametrize("kind", ["empty", "keepalive"])
async def test_a_stream_that_never_ends_is_ended(router, kind):
    """Empty deltas run into the event bound at once; keep-alives into the call's maximum duration."""
    request = chat(f"[[forever={kind}]]", max_tokens=5, stream=True)
    started = asyncio.get_running_loop().time()
    got = events([f async for f in router.stub.CreateChatCompletion(request, metadata=holding(
        "f-" + kind, output_tokens=5))])
    took = asyncio.get_running_loop().time() - started
    assert got[-1] == "[DONE]" and got[-2]["choices"][0]["finish_reason"] == "length"
    if kind == "keepalive":
        assert took >= 1.5 and prometheus_client.REGISTRY.get_sample_value(
            "router_calls_ended_total", {"reason": "max_duration"}) >= 1
    await router.settled(1)
    assert settlement(router, "f-" + kind).outcome == "completed"
    await asyncio.sleep(0.1)
    assert (await router.stats())["streams_cancelled"] == 1


async def test_an_abandoned_unary_call_runs_to_its_end_and_is_charged(router):
    """The client leaves while the backend works: the backend call goes on (bounded by its cap)
    and the call is charged for all it produced, as 'aborted'."""
    request = chat("[[tokens=30]] [[delay_ms=20]] take your time", max_tokens=30)
    call = router.stub.CreateChatCompletion(request, metadata=holding("gone", output_tokens=30))
    typed = router.stub.Chat(request, metadata=holding("gone-typed", output_tokens=30))
    reading = asyncio.ensure_future(typed)
    await asyncio.sleep(0.2)
    call.cancel()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert router.ledger.settled == [], "not voided when the client left"
    await router.settled(2)
    for hold_id in ("gone", "gone-typed"):
        s = settlement(router, hold_id)
        assert (s.outcome, s.units.input_tokens, s.units.output_tokens) == ("aborted", 5 + 4 + 3, 30)
    assert (await router.stats())["tokens_generated"] == 60


async def test_eleven_images_for_one_are_one_returned_and_charged(router):
    before = overruns(router, "images")
    request = router_pb2.CreateImageRequest(model="pictures", prompt="a lighthouse [[images=11]]", n=1,
                                            size="256x256")
    reply = await router.stub.CreateImage(request, metadata=holding("img", model="pictures", images=1))
    assert len(json.loads(reply.data)["data"]) == 1
    await router.settled(1)
    assert settlement(router, "img").units.images == 1
    assert overruns(router, "images") == before + 1


async def test_a_long_stream_renews_its_hold_and_ends_when_it_cannot(start_router, liar):
    """Claims come claim_after_s after the start and then every third of the hold lifetime;
    with the ledger taking none, the stream ends before its hold could lapse."""
    router = await start_router([liar], catalog_yaml(liar))
    settler = router.settler
    settler.claim_after_s, settler.hold_ttl_s, settler.renew_every_s, settler.hold_claim_s = 0.1, 0.9, 0.3, 1.0
    request = chat("[[tokens=100]] [[delay_ms=20]] a long story", max_tokens=100, stream=True)
    got = events([f async for f in router.stub.CreateChatCompletion(request, metadata=holding(
        "long", output_tokens=100))])
    assert got[-2]["choices"][0]["finish_reason"] == "stop"  # the backend's own end, 100 tokens later
    assert router.ledger.claimed.count("long") >= 2, "claimed, then renewed"
    request = chat("[[tokens=60]] [[delay_ms=20]] a long story", max_tokens=60, stream=True)
    router.ledger.down = True
    ends_before = prometheus_client.REGISTRY.get_sample_value("router_calls_ended_total", {"reason": "hold"}) or 0
    cut = events([f async for f in router.stub.CreateChatCompletion(request, metadata=holding(
        "lapsing", output_tokens=60))])
    words = sum(1 for c in cut[:-1] if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert cut[-2]["choices"][0]["finish_reason"] == "length" and 0 < words < 60
    assert prometheus_client.REGISTRY.get_sample_value("router_calls_ended_total", {"reason": "hold"}) == ends_before + 1
    router.ledger.down = False
    await router.settled(2)
    assert settlement(router, "lapsing").units.output_tokens == words


async def test_a_call_is_refused_when_its_hold_covers_no_output(router):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.Chat(chat("hi", n=3), metadata=holding("tiny", output_tokens=2))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert json.loads(caught.value.details())["error"]["code"] == "exceeds_hold"
    await router.settled(1)
    assert settlement(router, "tiny").outcome == "failed" and await sent(router) == []


async def test_a_stream_of_junk_is_skipped_and_charged_for_what_it_carried(start_router):
    """Events that are not chunks (numbers, lists, choices that are not objects) pass nothing
    on and cost nothing; the one real chunk goes through, and a lying usage is cut."""
    junk = [b"5", b"[1, 2]", b'"text"', b'{"choices": "x"}', b'{"choices": [5, null]}', b"{not json",
            b'{"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}',
            b'{"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 999999}}', b"[DONE]"]

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for data in junk:
            await response.write(b"data: " + data + b"\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        router = await start_router([url], catalog_yaml(url))
        request = chat("hi", model="plain-chat", stream=True)
        request.stream_options.include_usage = True
        got = events([f async for f in router.stub.CreateChatCompletion(request, metadata=holding(
            "junk", input_tokens=5, output_tokens=3, model="plain-chat"))])
        assert got[-1] == "[DONE]"
        assert [c["choices"][0]["delta"].get("content") for c in got[:-1] if c["choices"]] == ["hi"]
        assert got[-2]["usage"]["prompt_tokens"] == 5 and got[-2]["usage"]["completion_tokens"] == 3
        await router.settled(1)
        s = settlement(router, "junk")
        assert (s.outcome, s.units.input_tokens, s.units.output_tokens) == ("completed", 5, 3)
    finally:
        await runner.cleanup()
