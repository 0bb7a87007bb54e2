"""ledger_svc killed (SIGKILL) under load, then started again.

While it is down nothing can be held, so Envoy's ledger filter answers every new
call 503 in OpenAI's shape and the backend never sees them ("a dependency that
is down gives 503, never a free call"). Calls already past the filter run to the
end; router_svc cannot settle them, keeps their settlements in its outbox and
sends them once the ledger is back: each lands exactly once (a retry of an
answered settlement is a no-op in the ledger).

A hold the ledger committed just before it died, whose answer Envoy never got,
is released when it expires: the ledger here holds for HOLD_TTL_S (a short
lifetime so the test sees it; the default is 900 s).
"""
import asyncio
import json
import time

import pytest

from tests.faults.conftest import (Load, Shape, backend_stats, check_books, journal, kill, open_accounts, report,
                                   restart, running_mesh, usage_rows, wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
HOLD_TTL_S = 10
DOWN_S = 2.5


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with running_mesh(tmp_path_factory.mktemp("faults-ledger"),
                      env_of={"ledger_svc": {"TOKENS_HOLD_TTL_S": str(HOLD_TTL_S)}}) as mesh:
        yield mesh


def outbox_settled(mesh) -> int:
    """Settlements router_svc sent from its outbox, from its log."""
    total = 0
    for line in (mesh.logs / "router_svc#0.log").read_text(errors="replace").splitlines():
        if '"settled from the outbox"' in line:
            total += json.loads(line).get("count", 0)
    return total


async def test_ledger_killed_and_restarted_under_load(mesh):
    accounts = await open_accounts(mesh, paid=6, small=2)
    backend_before = (await backend_stats(mesh))["requests"]
    # Streams of about 0.6 s, so that some are in flight when the ledger dies.
    load = Load(mesh.config.base_url, accounts, clients=12, shape=Shape(stream_tokens=16, stream_delay_ms=40))
    async with load:
        await asyncio.sleep(2.0)
        sent_at, killed_at = await kill(mesh, "ledger_svc#0")
        await asyncio.sleep(DOWN_S)
        back_at = time.monotonic()
        await restart(mesh, "ledger_svc")
        up_at = time.monotonic()
        await asyncio.sleep(1.5)

    calls = load.calls
    # Calls that started before the ledger was gone and ended after; new ones started after.
    in_flight = [c for c in calls if c.started < killed_at < c.ended]
    during = [c for c in calls if killed_at <= c.started < back_at]
    # New calls while it was down: the documented 503, in OpenAI's shape (check_books checks the shape).
    assert during and all(c.kind == "http 503 service_unavailable" for c in during), \
        [c.kind for c in during if c.kind != "http 503 service_unavailable"]
    # Once Envoy routes to the new ledger again, calls are admitted again.
    after = [c for c in calls if c.started >= up_at]
    assert after and all(c.kind in ("ok", "http 402 402") for c in after), [c.kind for c in after]
    # Calls already running finished normally; their settlements wait in router_svc's outbox.
    finished = [c for c in in_flight if c.complete]
    assert finished and all(c.complete or c.kind in ("http 503 service_unavailable", "http 402 402")
                            for c in in_flight), [c.kind for c in in_flight]

    async def settled():
        rows = sum([len(await usage_rows(mesh, a.account_id)) for a in accounts])
        backend = (await backend_stats(mesh))["requests"] - backend_before
        return rows == backend

    # The outbox retries with backoff (1, 2, 4 s ...): every settlement lands within a few seconds.
    await wait_until(settled, 30, "every call the backend served settled", every_s=0.5)

    async def released():
        return (await journal(mesh)).pending_holds == 0

    await wait_until(released, HOLD_TTL_S + 10, "every hold settled or expired", every_s=0.5)
    books = await check_books(mesh, accounts, calls, backend_before=backend_before)
    from_outbox = outbox_settled(mesh)
    report("ledger killed", books, in_flight_at_kill=len(in_flight), in_flight_finished=len(finished),
           new_calls_while_down=len(during), ledger_back_after_s=round(up_at - sent_at, 1),
           settled_from_router_outbox=from_outbox)
    assert from_outbox >= 1
    for call in calls:
        assert call.kind in ("ok", "http 402 402", "http 503 service_unavailable"), call
        if call.kind == "http 503 service_unavailable":
            assert sent_at <= call.ended, call
