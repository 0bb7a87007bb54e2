"""Calls whose clients leave after ledger_svc held their credit but before router_svc ran them.

Envoy takes the hold in its ext_authz filter, then hands the call to router_svc.
A client that disconnects in between (a load generator stopping, a user closing
a tab, a proxy's timeout), or a router that cannot take the call (frozen here
with SIGSTOP), leaves a hold nobody will settle: no router handler ever ran. Such
a hold must not keep the customer's credit unavailable for the whole hold
lifetime (TOKENS_HOLD_TTL_S, 15 minutes by default): a new hold lives only
TOKENS_HOLD_CLAIM_S (CLAIM_S here) unless router_svc claims it, which it does for
every call still running TOKENS_HOLD_CLAIM_AFTER_S after it started. So:

- the abandoned calls' holds lapse within CLAIM_S (plus one expiry sweep), and
  nothing is charged for a call no backend served;
- a stream that runs longer than CLAIM_S keeps its hold until it ends (its
  router claimed it), so the credit it may still consume stays held;
- then the books balance, with nothing held.
"""
import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from tests.faults.conftest import (backend_stats, balance, journal, ledger_holds, open_accounts, running_mesh,
                                   usage_rows, wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
CLAIM_S = 3
CLAIM_AFTER_S = 0.5
ABANDONED = 12
# Long enough that the router has the calls' requests queued when it is frozen.
FROZEN_S = 1.5


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with running_mesh(tmp_path_factory.mktemp("faults-abandoned"),
                      env_of={"ledger_svc": {"TOKENS_HOLD_CLAIM_S": str(CLAIM_S)},
                              "router_svc": {"TOKENS_HOLD_CLAIM_AFTER_S": str(CLAIM_AFTER_S)}}) as mesh:
        yield mesh


def chat(content: str, *, stream: bool = False) -> dict:
    body = {"model": "ref-chat", "messages": [{"role": "user", "content": content}], "max_tokens": 20}
    return {**body, "stream": True, "stream_options": {"include_usage": True}} if stream else body


async def test_holds_of_abandoned_calls_lapse_and_a_long_stream_keeps_its_own(mesh):
    [account, streamer] = await open_accounts(mesh, paid=2, small=0)
    base = mesh.config.base_url
    router = mesh.procs["router_svc#0"]
    backend_before = (await backend_stats(mesh))["requests"]

    async def long_stream() -> str:
        # 20 tokens, 300 ms apart: about 6 s, twice CLAIM_S.
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", f"{base}/v1/chat/completions", headers=streamer.auth,
                                     json=chat("[[tokens=20]] [[delay_ms=300]] a long story", stream=True)) as reply:
                assert reply.status_code == 200
                return "".join([text async for text in reply.aiter_text()])

    async def abandoned(client: httpx.AsyncClient) -> None:
        with pytest.raises(httpx.TimeoutException):
            await client.post(f"{base}/v1/chat/completions", headers=account.auth, json=chat("hello"),
                              timeout=httpx.Timeout(30, read=FROZEN_S / 2))

    streaming = asyncio.ensure_future(long_stream())
    started = time.monotonic()
    await asyncio.sleep(CLAIM_AFTER_S + 0.5)  # the stream's router has claimed its hold
    os.kill(router.pid, signal.SIGSTOP)
    try:
        async with httpx.AsyncClient() as client:
            await asyncio.gather(*(abandoned(client) for _ in range(ABANDONED)))
        await asyncio.sleep(FROZEN_S / 2)
    finally:
        os.kill(router.pid, signal.SIGCONT)
    held = await balance(mesh, account.account_id)
    assert held.held_nanos > 0, "the abandoned calls were held"

    # Within the claim window (and one sweep), nothing of the abandoned calls is held.
    await wait_until(lambda: _nothing_held(mesh, account.account_id), CLAIM_S + 3, "the abandoned holds to lapse")
    # The long stream outlived the claim window and still holds its worst case.
    assert time.monotonic() - started > CLAIM_S and not streaming.done()
    assert (await balance(mesh, streamer.account_id)).held_nanos > 0, "a claimed hold lives until its call ends"

    text = await streaming
    assert text.rstrip().endswith("data: [DONE]")
    await wait_until(lambda: _nothing_held(mesh, streamer.account_id), 5, "the stream to settle")
    final = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert final[-1]["usage"]["completion_tokens"] == 20

    # What happened to each hold, from the ledger's own rows.
    holds = {h["request_id"]: h for h in await ledger_holds(mesh) if h["account_id"] == account.account_id}
    assert len(holds) == ABANDONED
    statuses = sorted(h["status"] for h in holds.values())
    assert set(statuses) <= {"expired", "posted", "voided"}, statuses
    assert "expired" in statuses, f"no call was abandoned before its router ran it: {statuses}"
    # A call the router did run after all was served and charged (posted) or voided; an expired one
    # cost nothing, and every backend call is one the router ran.
    served = (await backend_stats(mesh))["requests"] - backend_before
    charged = [r for r in await usage_rows(mesh, account.account_id) if r.outcome != "failed"]
    assert served == len(charged) + 1, (served, statuses)  # + the long stream
    assert statuses.count("posted") == len(charged)
    stats = await journal(mesh)
    assert (stats.pending_holds, stats.sum_of_balances_nanos) == (0, 0)
    # Operators see both in ledger_svc's metrics.
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{mesh.config.metrics_port('ledger_svc')}/metrics")).text
    metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith(("ledger_holds_expired_total", "ledger_holds_claimed_total"))}
    assert metrics["ledger_holds_expired_total"] == statuses.count("expired"), metrics
    assert metrics["ledger_holds_claimed_total"] >= 1, metrics  # the long stream
    print(f"\n{ABANDONED} abandoned calls: {statuses.count('expired')} holds lapsed within {CLAIM_S} s, "
          f"{statuses.count('posted')} ran anyway and were charged, {statuses.count('voided')} voided")


async def _nothing_held(mesh, account_id: str) -> bool:
    return (await balance(mesh, account_id)).held_nanos == 0
