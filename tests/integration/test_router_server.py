"""router_svc's text calls: build_server on port 0 in front of the real reference backend,
with a fake ledger_svc that records settlements (router_rig.py)."""
import asyncio
import json

import grpc
import pytest

from common import pricing
from router_svc import config as router_config, server as router_server
from tests.conftest import free_port
from tests.integration import router_rig
from tokens.router.v1 import router_pb2

PRICES = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}


def catalog_yaml(backend_urls: list[str]) -> str:
    backends = "".join(f"      - url: {u}/v1\n        continuous_usage: true\n" for u in backend_urls)
    return f"""models:
  - id: ref-chat
    type: text
    backends:
{backends}    limits: {{max_output_tokens: 256}}
    pricing: {{input_per_million_tokens: "0.50", output_per_million_tokens: "1.50"}}
  - id: pictures
    type: image
    backends:
      - url: {backend_urls[0]}/v1
    pricing: {{per_image: "0.04"}}
"""


@pytest.fixture
async def router(start_router, reference) -> router_rig.Router:
    return await start_router([reference], catalog_yaml([reference]))


HELD = (("x-ts-hold", "hold-1"), ("x-ts-price", pricing.encode_header(PRICES)), ("x-request-id", "req-1"))


def chat(**fields) -> router_pb2.CreateChatCompletionRequest:
    request = router_pb2.CreateChatCompletionRequest(model="ref-chat", **fields)
    if not request.messages:
        message = request.messages.add(role="user")
        message.content.string_value = "hello there"
    return request


async def test_unary_chat_returns_openai_json_with_cost(router):
    call = router.stub.CreateChatCompletion(chat(max_tokens=5), metadata=HELD)
    bodies = [m async for m in call]
    assert len(bodies) == 1 and bodies[0].content_type == "application/json"
    body = json.loads(bodies[0].data)
    assert body["object"] == "chat.completion" and body["model"] == "ref-chat"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] == 2 + 4 + 3
    cost = pricing.cost_nanos(PRICES, {"input_tokens": usage["prompt_tokens"], "output_tokens": 5})
    assert usage["cost"] == f"0.{cost:09d}".rstrip("0")
    assert dict(await call.initial_metadata())["x-usage-cost-usd"] == usage["cost"]
    [settlement] = await router.settled()
    assert settlement.hold_id == "hold-1" and settlement.outcome == "completed"
    assert (settlement.units.input_tokens, settlement.units.output_tokens) == (9, 5)


async def test_stream_is_sse_with_done_and_final_usage(router):
    request = chat(max_tokens=4, stream=True)
    request.stream_options.include_usage = True
    frames = [m async for m in router.stub.CreateChatCompletion(request, metadata=HELD)]
    assert frames[0].content_type == "text/event-stream"
    text = b"".join(f.data for f in frames).decode()
    events = [line[6:] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(content.split()) == 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["usage"]["cost"]
    [settlement] = await router.settled()
    assert settlement.outcome == "completed" and settlement.units.output_tokens == 4


async def test_stream_without_usage_option_has_no_usage(router):
    frames = [m async for m in router.stub.CreateChatCompletion(chat(max_tokens=3, stream=True), metadata=HELD)]
    chunks = [json.loads(e[6:]) for e in b"".join(f.data for f in frames).decode().split("\n\n")
              if e and e != "data: [DONE]"]
    assert all("usage" not in c for c in chunks)


async def test_abandoned_stream_is_settled_for_what_was_generated(router):
    request = chat(stream=True)
    request.messages[0].content.string_value = "go [[tokens=200]] [[delay_ms=20]]"
    call = router.stub.CreateChatCompletion(request, metadata=HELD)
    received = 0
    async for _frame in call:
        received += 1
        if received == 4:  # the role chunk and three words
            call.cancel()
            break
    [settlement] = await router.settled()
    assert settlement.outcome == "aborted"
    assert 3 <= settlement.units.output_tokens <= 5, settlement
    await asyncio.sleep(0.1)
    stats = (await router.stats())
    assert stats["streams_cancelled"] == 1 and stats["tokens_generated"] < 10


@pytest.mark.parametrize("fields,code,param", [
    ({"max_tokens": -1}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"max_tokens": 100000}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"temperature": 3.5}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"n": 0}, grpc.StatusCode.INVALID_ARGUMENT, "n"),
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "model"),
    ({"model": "pictures"}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
])
async def test_invalid_requests_are_refused_and_voided(router, fields, code, param):
    request = chat(**{k: v for k, v in fields.items() if k != "model"})
    if "model" in fields:
        request.model = fields["model"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in router.stub.CreateChatCompletion(request, metadata=HELD):
            pass
    assert caught.value.code() == code
    assert json.loads(caught.value.details())["error"]["param"] == param
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"
    assert (await router.stats())["requests"] == 0


async def test_a_call_without_a_hold_never_runs(router):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in router.stub.CreateChatCompletion(chat()):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await router.stats())["requests"] == 0


async def test_dead_backend_is_503_and_void(start_router):
    dead = [f"http://127.0.0.1:{free_port()}"]
    router = await start_router(dead, catalog_yaml(dead))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.Chat(chat(), metadata=HELD)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"


async def test_calls_move_to_a_live_backend(start_router, reference):
    urls = [f"http://127.0.0.1:{free_port()}", reference]
    router = await start_router(urls, catalog_yaml(urls))
    for _ in range(3):
        reply = await router.stub.Chat(chat(max_tokens=2), metadata=HELD)
        assert reply.usage.completion_tokens == 2


async def test_typed_methods_for_native_callers(router):
    reply = await router.stub.Chat(chat(max_tokens=3), metadata=HELD)
    assert reply.choices[0].message.role == "assistant" and len(reply.choices[0].message.content.split()) == 3
    assert reply.usage.cost
    chunks = [c async for c in router.stub.StreamChat(chat(max_tokens=3), metadata=HELD)]
    assert chunks[-1].usage.completion_tokens == 3
    completion = router_pb2.CreateCompletionRequest(model="ref-chat", max_tokens=2)
    completion.prompt.string_value = "once upon"
    done = await router.stub.Complete(completion, metadata=HELD)
    assert len(done.choices[0].text.split()) == 2


async def test_settlements_wait_in_the_outbox_while_the_ledger_is_down(router):
    router.ledger.down = True
    await router.stub.Chat(chat(max_tokens=2), metadata=HELD)
    for _ in range(100):
        if await router.outbox.depth() == 1:
            break
        await asyncio.sleep(0.02)
    assert await router.outbox.depth() == 1
    router.ledger.down = False
    [settlement] = await router.settled()
    assert settlement.units.output_tokens == 2
    for _ in range(100):
        if await router.outbox.depth() == 0:
            break
        await asyncio.sleep(0.02)
    assert await router.outbox.depth() == 0


async def test_models_list_with_current_prices(router):
    reply = await router.stub.ListModels(router_pb2.ListModelsRequest())
    by_id = {m.id: m for m in reply.data}
    assert by_id["ref-chat"].pricing["output_per_million_tokens"] == "1.50"
    assert by_id["pictures"].type == "image"


def test_unheld_calls_run_only_with_the_benchmark_switch():
    import dataclasses

    class Context:
        def invocation_metadata(self):
            return (("x-request-id", "r"),)

    settings = router_config.Settings.from_env()
    assert not settings.allow_unheld_for_benchmarks
    with pytest.raises(Exception, match="billing is unavailable"):
        router_server.Inference(settings, None, None, None, None)._begin(Context())
    switched = dataclasses.replace(settings, allow_unheld_for_benchmarks=True)
    inference = router_server.Inference(switched, None, None, None, None)
    call = inference._begin(Context())
    assert call.hold_id == ""
    inference._settle(call)  # nothing held, so nothing to settle (the settler is None here)


async def test_a_call_still_running_claims_its_hold_and_a_quick_one_does_not(router):
    """ledger_svc lets a hold nobody claimed lapse soon (its call never reached a
    router); a call that runs longer than claim_after_s claims it, once, batched."""
    ledger, settler = router.ledger, router.settler
    settler.claim_after_s = 0.2
    [_body] = [m async for m in router.stub.CreateChatCompletion(chat(max_tokens=4), metadata=HELD)]
    await router.settled(1)
    slow = chat(max_tokens=4, stream=True)
    slow.messages[0].content.string_value = "slowly [[delay_ms=300]]"
    held = tuple((k, "hold-slow" if k == "x-ts-hold" else v) for k, v in HELD)
    ledger.down = True  # the first claim (at about 0.3 s) is refused: it is sent again

    async def read() -> list:
        return [c async for c in router.stub.CreateChatCompletion(slow, metadata=held)]

    reading = asyncio.ensure_future(read())
    await asyncio.sleep(0.45)
    assert not reading.done() and ledger.claimed == []
    ledger.down = False
    chunks = await reading
    assert chunks[-1].data == b"data: [DONE]\n\n"
    await router.settled(2)
    assert ledger.claimed == ["hold-slow"], "only the call that outlived claim_after_s claims its hold"
    assert [s.hold_id for s in ledger.settled] == ["hold-1", "hold-slow"]
    await asyncio.sleep(0.3)
    assert ledger.claimed == ["hold-slow"]
