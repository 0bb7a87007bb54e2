"""No call costs more than was held, whatever the backend does: end to end through Envoy.

The module runs its own mesh whose reference backend lies (TOKENS_BACKEND_MISBEHAVE:
it ignores max_tokens, reports any usage it is told to, streams forever, returns 11
images for n=1) and records what it received (TOKENS_BACKEND_RECORD_REQUESTS), and
whose holds live only HOLD_TTL_S (claimed after CLAIM_AFTER_S, renewed every third of
the lifetime), so that a stream can outlive its hold's lifetime in a few seconds.
No baseline listener: nothing but router_svc reaches the backend through Envoy.

Each test is a stranger's attempt on the public API; what it asserts is what the
public page and the README promise: the backend is always sent the cap; a cap above
the model's is a 400 that costs nothing; an overrun, a lying usage report or 11
images are charged at most the hold; 50 parallel uncapped calls on a one-cent account
leave it no lower than minus one call's worst case; a non-streamed call the client
abandons is charged; a stream past the hold's lifetime keeps its hold; a stream that
never ends is ended at the documented maximum.
"""
import asyncio
import json
import time
import uuid

import httpx
import pytest

from common import money
from tests.e2e.conftest import assert_openai_error, mesh_config
from tests.faults.conftest import (balance, cost_nanos, ledger_holds, open_account, prices_nanos, usage_rows,
                                   wait_until)
from devtool import up

pytestmark = pytest.mark.timeout(180)

HOLD_TTL_S = 4
HOLD_CLAIM_S = 3
CLAIM_AFTER_S = 0.3
CALL_MAX_S = 12
# A settlement lands within this (batched; an abandoned call's once its backend answered).
SETTLE_S = 15
PARALLEL = 50
ONE_CENT = 10_000_000
# ledger_svc's worst case of a chat call: UTF-8 bytes + 8 per message + 8 as input tokens.
TOKENS_PER_MESSAGE, TOKENS_PER_CALL = 8, 8
MODEL_CAPS = {"ref-chat": 4096, "ref-chat-large": 16_384, "ref-instruct": 2048}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    hold = {"TOKENS_HOLD_TTL_S": str(HOLD_TTL_S), "TOKENS_HOLD_CLAIM_S": str(HOLD_CLAIM_S)}
    config = mesh_config(tmp_path_factory.mktemp("caps"), baseline_port=None, env_of={
        "reference": {"TOKENS_BACKEND_MISBEHAVE": "1", "TOKENS_BACKEND_RECORD_REQUESTS": "500"},
        "ledger_svc": hold,
        "router_svc": {**hold, "TOKENS_HOLD_CLAIM_AFTER_S": str(CLAIM_AFTER_S), "TOKENS_CALL_MAX_S": str(CALL_MAX_S),
                       "TOKENS_VIDEO_JOB_TIMEOUT_S": "2"}})
    instance = up.Mesh(config)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
async def http(mesh):
    async with httpx.AsyncClient(base_url=mesh.config.base_url, timeout=60) as client:
        yield client


@pytest.fixture
async def account(mesh, http):
    return await open_account(mesh, http)


def marked(text: str) -> tuple[str, str]:
    """(a marker unique to this call, the content carrying it)."""
    marker = f"m{uuid.uuid4().hex[:12]}"
    return marker, f"{text} {marker}"


def chat(model: str, content: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


async def received(mesh, marker: str) -> list[dict]:
    """The bodies the backend received for calls whose content holds `marker`."""
    async with httpx.AsyncClient(timeout=10) as client:
        recorded = (await client.get(f"http://127.0.0.1:{mesh.config.backend_port}/_requests")).json()["data"]
    return [r["body"] for r in recorded if marker in json.dumps(r["body"])]


async def worst_nanos(mesh, model: str, content: str, output_tokens: int) -> int:
    """ledger_svc's hold for one chat message, computed here on its own."""
    units = {"input_tokens": len(content.encode()) + TOKENS_PER_MESSAGE + TOKENS_PER_CALL,
             "output_tokens": output_tokens}
    return cost_nanos(await prices_nanos(mesh, model), units)


async def settled_row(mesh, account_id: str, request_id: str | None):
    """The usage row of a call (None: the account's only one) once nothing is held any more."""
    async def row():
        rows = [r for r in await usage_rows(mesh, account_id) if request_id in (None, r.request_id)]
        held = (await balance(mesh, account_id)).held_nanos
        return rows[0] if rows and held == 0 else None
    return await wait_until(row, SETTLE_S, f"the settlement of {request_id}")


def sse(text: str) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body, and whether it ended with [DONE]."""
    blocks = [b[6:] for b in text.split("\n\n") if b.startswith("data: ")]
    return [json.loads(b) for b in blocks if b != "[DONE]"], blocks[-1:] == ["[DONE]"]


async def test_calls_without_caps_send_the_backend_the_models_cap(mesh, http, account):
    calls = [("ref-chat", {}, {"max_tokens": 4096}),
             ("ref-chat-large", {"stream": True}, {"max_tokens": 16_384}),
             ("ref-chat", {"n": 2}, {"max_tokens": 4096}),
             ("ref-chat", {"max_completion_tokens": 7}, {"max_completion_tokens": 7}),
             ("ref-chat", {"max_tokens": 9, "max_completion_tokens": 7}, {"max_tokens": 7, "max_completion_tokens": 7})]
    for model, fields, expected in calls:
        marker, content = marked("[[tokens=3]] hello")
        reply = await http.post("/v1/chat/completions", headers=account.auth, json=chat(model, content, **fields))
        assert reply.status_code == 200, reply.text
        [body] = await received(mesh, marker)
        assert {k: body.get(k) for k in expected} == expected, (fields, body)
        assert not ({"max_tokens", "max_completion_tokens"} - set(expected)) & set(body), body
    marker, content = marked("once upon")
    reply = await http.post("/v1/completions", headers=account.auth,
                            json={"model": "ref-instruct", "prompt": content})
    assert reply.status_code == 200, reply.text
    [body] = await received(mesh, marker)
    assert body["max_tokens"] == MODEL_CAPS["ref-instruct"]


async def test_a_cap_above_the_models_is_refused_and_costs_nothing(mesh, http, account):
    before = await balance(mesh, account.account_id)
    for field in ("max_tokens", "max_completion_tokens"):
        marker, content = marked("hello")
        reply = await http.post("/v1/chat/completions", headers=account.auth,
                                json=chat("ref-chat", content, **{field: MODEL_CAPS["ref-chat"] + 1}))
        error = assert_openai_error(reply, 400, "invalid_value")
        assert error["param"] == field
        assert await received(mesh, marker) == []
    await asyncio.sleep(0.5)  # a settlement would have landed by now
    after = await balance(mesh, account.account_id)
    assert (after.balance_nanos, after.held_nanos) == (before.balance_nanos, 0)


async def test_a_unary_overrun_and_a_lying_usage_are_charged_at_most_the_hold(mesh, http, account):
    for text, cap in (("[[ignore_max_tokens]] [[tokens=100000]] a long story", None),
                      ("[[usage=1000000,1000000]] [[tokens=5]] a short one", 10)):
        before = (await balance(mesh, account.account_id)).balance_nanos
        content = marked(text)[1]
        fields = {} if cap is None else {"max_tokens": cap}
        reply = await http.post("/v1/chat/completions", headers=account.auth,
                                json=chat("ref-chat-large", content, **fields))
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        worst = await worst_nanos(mesh, "ref-chat-large", content, cap or MODEL_CAPS["ref-chat-large"])
        assert money.parse_usd(usage["cost"]) <= worst, (usage, worst)
        assert usage["completion_tokens"] <= (cap or MODEL_CAPS["ref-chat-large"])
        row = await settled_row(mesh, account.account_id, reply.headers["x-request-id"])
        assert row.cost_usd == usage["cost"] and row.outcome == "completed"
        after = (await balance(mesh, account.account_id)).balance_nanos
        assert before - after == money.parse_usd(usage["cost"])


async def test_a_streamed_overrun_ends_with_length_at_the_hold(mesh, http, account):
    content = marked("[[ignore_max_tokens]] [[tokens=500]] [[delay_ms=1]] go on")[1]
    body = chat("ref-chat", content, max_tokens=20, stream=True, stream_options={"include_usage": True})
    async with http.stream("POST", "/v1/chat/completions", headers=account.auth, json=body) as reply:
        assert reply.status_code == 200
        request_id = reply.headers["x-request-id"]
        events, done = sse((await reply.aread()).decode())
    assert done
    words = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert sum(1 for w in words if w) == 20
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 20
    row = await settled_row(mesh, account.account_id, request_id)
    assert row.units.output_tokens == 20 and row.cost_usd == events[-1]["usage"]["cost"]
    assert money.parse_usd(row.cost_usd) <= await worst_nanos(mesh, "ref-chat", content, 20)
    # The operator sees it: counted per backend in router_svc's metrics.
    metrics = (await http.get(f"http://127.0.0.1:{mesh.config.metrics_port('router_svc')}/metrics")).text
    backend = f'backend="http://127.0.0.1:{mesh.config.backend_port}/v1"'
    assert any(line.startswith("router_backend_overruns_total{") and backend in line
               and 'unit="output_tokens"' in line and float(line.split()[-1]) >= 1 for line in metrics.splitlines())


async def test_eleven_images_for_one_are_one_returned_and_one_charged(mesh, http, account):
    before = (await balance(mesh, account.account_id)).balance_nanos
    reply = await http.post("/v1/images/generations", headers=account.auth,
                            json={"model": "ref-image", "prompt": "a lighthouse [[images=11]]", "n": 1,
                                  "size": "256x256"})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["data"]) == 1 and reply.headers["x-usage-cost-usd"] == "0.04"
    row = await settled_row(mesh, account.account_id, reply.headers["x-request-id"])
    assert row.units.images == 1
    assert before - (await balance(mesh, account.account_id)).balance_nanos == 40_000_000


async def test_parallel_uncapped_calls_on_one_cent_end_no_lower_than_one_worst_case(mesh, http):
    account = await open_account(mesh, http, tier="paid", available_nanos=ONE_CENT)
    content = "[[ignore_max_tokens]] [[tokens=100000]] [[usage=1000000,1000000]] everything"
    limits = httpx.Limits(max_connections=PARALLEL)
    async with httpx.AsyncClient(base_url=mesh.config.base_url, timeout=60, limits=limits) as client:
        replies = await asyncio.gather(*(client.post("/v1/chat/completions", headers=account.auth,
                                                     json=chat("ref-chat-large", content))
                                         for _ in range(PARALLEL)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) == {200, 402} and statuses.count(200) >= 1, statuses
    ran = [r for r in replies if r.status_code == 200]
    for reply in ran:
        await settled_row(mesh, account.account_id, reply.headers["x-request-id"])
    worst = await worst_nanos(mesh, "ref-chat-large", content, MODEL_CAPS["ref-chat-large"])
    final = await balance(mesh, account.account_id)
    assert final.held_nanos == 0
    assert final.balance_nanos >= -worst, (money.usd(final.balance_nanos), money.usd(worst))
    charged = sum(money.parse_usd(r.json()["usage"]["cost"]) for r in ran)
    assert final.balance_nanos == ONE_CENT - charged


async def test_an_abandoned_unary_call_is_charged_for_what_was_generated(mesh, http, account):
    content = marked("[[tokens=40]] [[delay_ms=50]] take your time")[1]
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/v1/chat/completions", headers=account.auth, json=chat("ref-chat", content, max_tokens=40),
                        timeout=httpx.Timeout(30, read=0.5))
    row = await settled_row(mesh, account.account_id, None)  # the account's one call
    assert (row.outcome, row.units.output_tokens) == ("aborted", 40)
    assert money.parse_usd(row.cost_usd) > 0


async def test_a_stream_past_its_holds_lifetime_keeps_its_hold(mesh, http, account):
    """The hold would lapse HOLD_TTL_S after its first claim; the router renews it while the
    stream runs, so past that the credit is still held, and the stream ends, charged, with
    nothing held."""
    content = marked("[[tokens=90]] [[delay_ms=100]] a long story")[1]
    body = chat("ref-chat", content, max_tokens=90, stream=True, stream_options={"include_usage": True})

    async def stream() -> tuple[str, str]:
        async with http.stream("POST", "/v1/chat/completions", headers=account.auth, json=body) as reply:
            assert reply.status_code == 200
            return reply.headers["x-request-id"], (await reply.aread()).decode()

    started = time.monotonic()
    streaming = asyncio.ensure_future(stream())
    # Well past the first claim's lifetime and the ledger's next expiry sweep (every 0.75 s here).
    await asyncio.sleep(CLAIM_AFTER_S + HOLD_TTL_S + 2.5)
    assert not streaming.done(), "the stream is still running"
    [hold] = [h for h in await ledger_holds(mesh) if h["account_id"] == account.account_id]
    assert hold["status"] == "pending", hold
    assert (await balance(mesh, account.account_id)).held_nanos == hold["amount_nanos"] > 0
    renewed_ms = (time.monotonic() - started) * 1000
    assert hold["expires_ms"] - hold["created_ms"] > renewed_ms, "renewed: it expires after now, not TTL after a claim"
    request_id, text = await streaming
    events, done = sse(text)
    assert done and events[-1]["usage"]["completion_tokens"] == 90
    row = await settled_row(mesh, account.account_id, request_id)
    assert (row.outcome, row.units.output_tokens) == ("completed", 90)
    [settled] = [h for h in await ledger_holds(mesh) if h["request_id"] == request_id]
    assert settled["status"] == "posted", settled


async def test_a_stream_that_never_ends_is_ended_at_the_maximum_duration(mesh, http, account):
    content = marked("[[forever=keepalive]] talk to me")[1]
    body = chat("ref-chat", content, max_tokens=50, stream=True, stream_options={"include_usage": True})
    started = time.monotonic()
    async with http.stream("POST", "/v1/chat/completions", headers=account.auth, json=body) as reply:
        assert reply.status_code == 200
        request_id = reply.headers["x-request-id"]
        events, done = sse((await reply.aread()).decode())
    assert time.monotonic() - started >= CALL_MAX_S
    assert done and [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    row = await settled_row(mesh, account.account_id, request_id)
    assert row.outcome == "completed" and row.units.output_tokens == 0
