"""A router_svc replica killed (SIGKILL) mid-stream, with two replicas behind Envoy.

What the clients see: the streams that replica was serving end early (Envoy cuts
the response: no [DONE]); unary calls it was serving, and new calls Envoy sends
it before its health checks notice (about two seconds), get Envoy's 503 in
OpenAI's shape. Every other call goes to the other replica and completes.

What the customer is charged for a call cut by a router crash: nothing. The
replica died before it could settle, so the call's hold is never posted; the
ledger voids it when it expires (TOKENS_HOLD_CLAIM_S, 60 s by default, for a call
that had run less than router_svc's TOKENS_HOLD_CLAIM_AFTER_S, else
TOKENS_HOLD_TTL_S, 900 s; HOLD_TTL_S bounds both here). Until then the hold keeps that much of the account's credit unavailable.
The output the client got before the cut is free, and its cost is bounded by the
hold, the call's worst case (max_tokens caps it): the same bound as the design's
"a balance ends below zero by at most one call's worst case". The backend stops
generating when the router's connection to it drops. A call the replica finished
a few milliseconds before it died can be free the same way: its settlement was
still waiting in the replica's memory for the next batch to the ledger.
"""
import asyncio

import pytest

from common import money
from tests.faults.conftest import (Load, Shape, backend_stats, check_books, cost_nanos, journal, kill,
                                   ledger_holds, open_accounts, prices_nanos, report, restart, running_mesh,
                                   wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
HOLD_TTL_S = 4


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with running_mesh(tmp_path_factory.mktemp("faults-router"), replicas_of={"router_svc": 2},
                      env_of={"ledger_svc": {"TOKENS_HOLD_TTL_S": str(HOLD_TTL_S)}}) as mesh:
        yield mesh


async def test_a_router_replica_killed_mid_stream(mesh):
    accounts = await open_accounts(mesh, paid=6, small=2)
    backend_before = (await backend_stats(mesh))["requests"]
    # Streams of about 2 s: each replica is serving several when one dies.
    shape = Shape(stream_share=0.6, stream_tokens=40, stream_delay_ms=50)
    load = Load(mesh.config.base_url, accounts, clients=12, shape=shape)
    async with load:
        await asyncio.sleep(2.5)
        sent_at, killed_at = await kill(mesh, "router_svc#1")
        await asyncio.sleep(2.5)
        await restart(mesh, "router_svc", 1)
        await asyncio.sleep(1.5)

    calls = load.calls
    cut = [c for c in calls if c.kind == "cut"]
    in_flight = [c for c in calls if c.started < killed_at < c.ended]
    # The killed replica was serving streams: their clients saw them end early, after some output.
    assert cut and all(c.stream and c.started < killed_at for c in cut), cut
    assert any(c.chunks > 0 for c in cut), cut
    # The other replica's streams went on to the end.
    assert any(c.complete and c.stream for c in in_flight)
    stats_after = await backend_stats(mesh)

    async def released():
        return (await journal(mesh)).pending_holds == 0

    await wait_until(released, HOLD_TTL_S + 10, "the killed replica's holds expired", every_s=0.5)
    # A call the dying replica finished a moment before the kill may be free as well: its
    # settlement was still in the replica's memory (they go to the ledger in batches every
    # couple of milliseconds). The test allows it, and checks its hold expired.
    just_before = [c for c in calls if c.complete and sent_at - 0.25 <= c.ended <= killed_at]
    free_ok = frozenset(c.request_id for c in cut + just_before)
    books = await check_books(mesh, accounts, calls, free_ok=free_ok, backend_before=backend_before)
    assert {c.request_id for c in cut if c.got_output} <= {c.request_id for c in books.free_calls}

    # Each free call: its hold expired (charged 0), and what the client got cost at most the hold.
    prices = await prices_nanos(mesh)
    holds = {h["request_id"]: h for h in await ledger_holds(mesh)}
    for call in books.free_calls:
        hold = holds[call.request_id]
        assert hold["status"] == "expired" and not hold["cost_nanos"], hold
        if call.complete:
            received = money.parse_usd(call.usage["cost"])
        else:
            input_tokens = len(call.content.split()) + 4 + 3  # the reference backend's count (README)
            received = cost_nanos(prices, {"input_tokens": input_tokens, "output_tokens": call.chunks})
        assert received <= hold["amount_nanos"], (hold, call.chunks)
    cut_503 = [c for c in calls if c.kind == "http 503 service_unavailable"]
    for call in cut_503:
        assert call.ended >= sent_at, call  # no 503 before the crash
        hold = holds.get(call.request_id)
        # Sent to the dead replica after the ledger held it: the hold expires, nothing charged.
        assert hold is None or hold["status"] == "expired", hold
    report("router replica killed", books, in_flight_at_kill=len(in_flight), streams_cut=len(cut),
           free_calls=len(books.free_calls), chunks_received_free=sum(c.chunks for c in books.free_calls),
           envoy_503=len(cut_503), envoy_503_with_hold=sum(1 for c in cut_503 if c.request_id in holds),
           holds_expired=sum(1 for h in holds.values() if h["status"] == "expired"),
           backend_streams_cancelled=stats_after["streams_cancelled"])
    for call in calls:
        assert call.kind in ("ok", "cut", "http 402 402", "http 503 service_unavailable"), call
