"""router_svc built with build_server on port 0, in front of the real reference
backend, with a fake ledger_svc that records settlements."""
import asyncio
import json

import grpc
import httpx
import pytest

from backends.reference import app as ref_app, config as ref_config
from common import catalog, config as common_config, db, migrate, pricing
from router_svc import backends as backends_mod, config as router_config, server as router_server, settle
from router_svc import store as router_store
from tests.conftest import free_port
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tokens.router.v1 import router_pb2, router_pb2_grpc

PRICES = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}


class FakeLedger(ledger_pb2_grpc.LedgerServicer):
    def __init__(self) -> None:
        self.settled: list[ledger_pb2.Settlement] = []
        self.claimed: list[str] = []
        self.down = False

    async def Settle(self, request, context):
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        self.settled.extend(request.settlements)
        return ledger_pb2.SettleResponse(results=[ledger_pb2.SettleResult(hold_id=s.hold_id, status="posted")
                                                  for s in request.settlements])

    async def ClaimHolds(self, request, context):
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        self.claimed.extend(request.hold_ids)
        return ledger_pb2.ClaimHoldsResponse(claimed=len(request.hold_ids))

    async def GetPrices(self, request, context):
        return ledger_pb2.GetPricesResponse(prices=[ledger_pb2.ModelPrice(
            model="ref-chat", pricing={"input_per_million_tokens": "0.50", "output_per_million_tokens": "1.50"})])


def write_catalog(path, backend_urls):
    backends = "".join(f"      - url: {u}/v1\n        continuous_usage: true\n" for u in backend_urls)
    path.write_text(f"""models:
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
""")
    return catalog.load(path)


@pytest.fixture
async def reference():
    runner, port = await ref_app.start(ref_config.Settings(host="127.0.0.1", port=0, token_delay_ms=0,
                                                           default_tokens=16, api_key=""))
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def router(tmp_path, reference):
    return await _router(tmp_path, [reference])


async def _router(tmp_path, backend_urls):
    ledger = FakeLedger()
    ledger_server = grpc.aio.server()
    ledger_pb2_grpc.add_LedgerServicer_to_server(ledger, ledger_server)
    ledger_port = ledger_server.add_insecure_port("127.0.0.1:0")
    await ledger_server.start()
    url = f"sqlite:///{tmp_path / 'router.db'}"
    await migrate.upgrade("router_svc", url)
    outbox = router_store.OutboxStore(db.make_engine(url))
    settings = router_config.Settings(
        server=common_config.ServerSettings("127.0.0.1", 0, "INFO", "", 0, 1), database_url=url,
        database_schema="", catalog_path=tmp_path / "catalog.yaml", ledger_addr=f"127.0.0.1:{ledger_port}",
        settle_linger_s=0, outbox_retry_s=0.05)
    catalog_ = write_catalog(settings.catalog_path, backend_urls)
    channel = grpc.aio.insecure_channel(settings.ledger_addr)
    settler = settle.Settler(ledger_pb2_grpc.LedgerStub(channel), outbox, internal_token="", timeout_s=1,
                             batch_max=100, linger_s=0, queue_max=1000, retry_s=0.05)
    backends = backends_mod.Backends(connect_timeout_s=1, idle_timeout_s=10, total_timeout_s=10,
                                     max_connections=10, down_s=5)
    await backends.start()
    settler.start()
    server, port, _health = router_server.build_server(settings, catalog_, backends, settler,
                                                       ledger_pb2_grpc.LedgerStub(channel))
    await server.start()
    client = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    fixture = {"stub": router_pb2_grpc.InferenceStub(client), "ledger": ledger, "backend": backend_urls[0],
               "outbox": outbox, "settler": settler}
    _cleanups.append((client, server, settler, backends, channel, ledger_server, outbox))
    return fixture


_cleanups: list = []


@pytest.fixture(autouse=True)
async def _cleanup():
    yield
    while _cleanups:
        client, server, settler, backends, channel, ledger_server, outbox = _cleanups.pop()
        await client.close()
        await server.stop(None)
        await settler.stop()
        await backends.close()
        await channel.close()
        await ledger_server.stop(None)
        await outbox.close()


HELD = (("x-ts-hold", "hold-1"), ("x-ts-price", pricing.encode_header(PRICES)), ("x-request-id", "req-1"))


def chat(**fields) -> router_pb2.CreateChatCompletionRequest:
    request = router_pb2.CreateChatCompletionRequest(model="ref-chat", **fields)
    if not request.messages:
        message = request.messages.add(role="user")
        message.content.string_value = "hello there"
    return request


async def backend_stats(url: str) -> dict:
    async with httpx.AsyncClient() as client:
        return (await client.get(url + "/_stats")).json()


async def settled(ledger: FakeLedger, count: int = 1) -> list[ledger_pb2.Settlement]:
    for _ in range(200):
        if len(ledger.settled) >= count:
            return ledger.settled
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} settlements, got {ledger.settled}")


async def test_unary_chat_returns_openai_json_with_cost(router):
    call = router["stub"].CreateChatCompletion(chat(max_tokens=5), metadata=HELD)
    bodies = [m async for m in call]
    assert len(bodies) == 1 and bodies[0].content_type == "application/json"
    body = json.loads(bodies[0].data)
    assert body["object"] == "chat.completion" and body["model"] == "ref-chat"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] == 2 + 4 + 3
    cost = pricing.cost_nanos(PRICES, {"input_tokens": usage["prompt_tokens"], "output_tokens": 5})
    assert usage["cost"] == f"0.{cost:09d}".rstrip("0")
    assert dict(await call.initial_metadata())["x-usage-cost-usd"] == usage["cost"]
    [settlement] = await settled(router["ledger"])
    assert settlement.hold_id == "hold-1" and settlement.outcome == "completed"
    assert (settlement.units.input_tokens, settlement.units.output_tokens) == (9, 5)


async def test_stream_is_sse_with_done_and_final_usage(router):
    request = chat(max_tokens=4, stream=True)
    request.stream_options.include_usage = True
    frames = [m async for m in router["stub"].CreateChatCompletion(request, metadata=HELD)]
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
    [settlement] = await settled(router["ledger"])
    assert settlement.outcome == "completed" and settlement.units.output_tokens == 4


async def test_stream_without_usage_option_has_no_usage(router):
    frames = [m async for m in router["stub"].CreateChatCompletion(chat(max_tokens=3, stream=True), metadata=HELD)]
    chunks = [json.loads(e[6:]) for e in b"".join(f.data for f in frames).decode().split("\n\n")
              if e and e != "data: [DONE]"]
    assert all("usage" not in c for c in chunks)


async def test_abandoned_stream_is_settled_for_what_was_generated(router):
    request = chat(stream=True)
    request.messages[0].content.string_value = "go [[tokens=200]] [[delay_ms=20]]"
    call = router["stub"].CreateChatCompletion(request, metadata=HELD)
    received = 0
    async for _frame in call:
        received += 1
        if received == 4:  # the role chunk and three words
            call.cancel()
            break
    [settlement] = await settled(router["ledger"])
    assert settlement.outcome == "aborted"
    assert 3 <= settlement.units.output_tokens <= 5, settlement
    await asyncio.sleep(0.1)
    stats = (await backend_stats(router["backend"]))
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
        async for _ in router["stub"].CreateChatCompletion(request, metadata=HELD):
            pass
    assert caught.value.code() == code
    assert json.loads(caught.value.details())["error"]["param"] == param
    [settlement] = await settled(router["ledger"])
    assert settlement.outcome == "failed"
    assert (await backend_stats(router["backend"]))["requests"] == 0


async def test_a_call_without_a_hold_never_runs(router):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in router["stub"].CreateChatCompletion(chat()):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await backend_stats(router["backend"]))["requests"] == 0


async def test_dead_backend_is_503_and_void(tmp_path):
    router = await _router(tmp_path, [f"http://127.0.0.1:{free_port()}"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router["stub"].Chat(chat(), metadata=HELD)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    [settlement] = await settled(router["ledger"])
    assert settlement.outcome == "failed"


async def test_calls_move_to_a_live_backend(tmp_path, reference):
    router = await _router(tmp_path, [f"http://127.0.0.1:{free_port()}", reference])
    for _ in range(3):
        reply = await router["stub"].Chat(chat(max_tokens=2), metadata=HELD)
        assert reply.usage.completion_tokens == 2


async def test_typed_methods_for_native_callers(router):
    reply = await router["stub"].Chat(chat(max_tokens=3), metadata=HELD)
    assert reply.choices[0].message.role == "assistant" and len(reply.choices[0].message.content.split()) == 3
    assert reply.usage.cost
    chunks = [c async for c in router["stub"].StreamChat(chat(max_tokens=3), metadata=HELD)]
    assert chunks[-1].usage.completion_tokens == 3
    completion = router_pb2.CreateCompletionRequest(model="ref-chat", max_tokens=2)
    completion.prompt.string_value = "once upon"
    done = await router["stub"].Complete(completion, metadata=HELD)
    assert len(done.choices[0].text.split()) == 2


async def test_settlements_wait_in_the_outbox_while_the_ledger_is_down(router):
    router["ledger"].down = True
    await router["stub"].Chat(chat(max_tokens=2), metadata=HELD)
    for _ in range(100):
        if await router["outbox"].depth() == 1:
            break
        await asyncio.sleep(0.02)
    assert await router["outbox"].depth() == 1
    router["ledger"].down = False
    [settlement] = await settled(router["ledger"])
    assert settlement.units.output_tokens == 2
    for _ in range(100):
        if await router["outbox"].depth() == 0:
            break
        await asyncio.sleep(0.02)
    assert await router["outbox"].depth() == 0


async def test_models_list_with_current_prices(router):
    reply = await router["stub"].ListModels(router_pb2.ListModelsRequest())
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
    ledger, settler = router["ledger"], router["settler"]
    settler.claim_after_s = 0.2
    [_body] = [m async for m in router["stub"].CreateChatCompletion(chat(max_tokens=4), metadata=HELD)]
    await settled(ledger, 1)
    slow = chat(max_tokens=4, stream=True)
    slow.messages[0].content.string_value = "slowly [[delay_ms=300]]"
    held = tuple((k, "hold-slow" if k == "x-ts-hold" else v) for k, v in HELD)
    ledger.down = True  # the first claim (at about 0.3 s) is refused: it is sent again

    async def read() -> list:
        return [c async for c in router["stub"].CreateChatCompletion(slow, metadata=held)]

    reading = asyncio.ensure_future(read())
    await asyncio.sleep(0.45)
    assert not reading.done() and ledger.claimed == []
    ledger.down = False
    chunks = await reading
    assert chunks[-1].data == b"data: [DONE]\n\n"
    await settled(ledger, 2)
    assert ledger.claimed == ["hold-slow"], "only the call that outlived claim_after_s claims its hold"
    assert [s.hold_id for s in ledger.settled] == ["hold-1", "hold-slow"]
    await asyncio.sleep(0.3)
    assert ledger.claimed == ["hold-slow"]
