"""Redis killed (SIGKILL) and started again under load.

ratelimit_svc trips to its in-memory windows on the first failed Redis call and
probes Redis every second; when Redis answers again it copies what it admitted
from memory into Redis and goes back. Calls keep flowing throughout: none fails
except the documented ones (402 on the nearly empty accounts), and limits hold.

The documented bound while degraded (ratelimit_svc.store.FailoverWindowStore):
each replica limits on its own, from the moment of the outage. What Redis had
admitted before is not known to the replicas' memory, and Redis here (as in
docker-compose.yml) keeps nothing across a restart, so a key that had spent its
window before the outage gets up to `limit` more per replica while Redis is
away: across an outage, at most limit x (1 + replicas) calls in a window. This
test measures exactly that bound (one ratelimit replica: at most 2 x limit).
"""
import asyncio

import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import clients
from tests.faults.conftest import (Load, backend_stats, check_books, kill, open_account, open_accounts, report,
                                   running_mesh, wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
FREE_LIMIT = 10
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with running_mesh(tmp_path_factory.mktemp("faults-redis")) as mesh:
        yield mesh


async def redis_health(mesh) -> int:
    """ratelimit_svc's "redis" health entry: NOT_SERVING while it limits from memory."""
    async with clients.channel(mesh.config.addresses("ratelimit_svc"), mesh.config.tls_files()) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="redis"),
                                                                timeout=5)
    return reply.status


async def burst(load: Load, account, count: int) -> list:
    return list(await asyncio.gather(*(load.call(account, stream=False) for _ in range(count))))


def admitted(calls) -> int:
    return sum(1 for c in calls if c.status == 200)


async def test_redis_killed_and_restarted_under_load(mesh):
    accounts = await open_accounts(mesh, paid=6, small=2)
    async with httpx.AsyncClient(timeout=30) as client:
        spent, during, after = [await open_account(mesh, client, tier="free") for _ in range(3)]
    backend_before = (await backend_stats(mesh))["requests"]
    load = Load(mesh.config.base_url, accounts, clients=12)
    async with load:
        await asyncio.sleep(1.5)
        # A Free key spends its whole window while Redis is up.
        first = await burst(load, spent, FREE_LIMIT + 3)
        await kill(mesh, "redis")
        await asyncio.sleep(1.0)
        assert await redis_health(mesh) != SERVING
        # Degraded: a fresh Free key still gets exactly its limit (one ratelimit replica) ...
        degraded_fresh = await burst(load, during, FREE_LIMIT + 5)
        # ... and the key that spent its window before the outage: its Redis admissions are
        # not in memory, so it gets a window of its own here (the documented bound).
        degraded_spent = await burst(load, spent, 5)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(mesh.start_redis)

        async def serving():
            return await redis_health(mesh) == SERVING

        await wait_until(serving, 15, "ratelimit_svc back on Redis")
        # Back on Redis: exact again, and what memory admitted during the outage still counts.
        recovered_fresh = await burst(load, after, FREE_LIMIT + 5)
        recovered_during = await burst(load, during, 3)
        recovered_spent = await burst(load, spent, FREE_LIMIT + 5)
        await asyncio.sleep(1.0)

    books = await check_books(mesh, accounts + [spent, during, after], load.calls, backend_before=backend_before)
    probes = {"before": admitted(first), "degraded fresh": admitted(degraded_fresh),
              "degraded spent": admitted(degraded_spent), "recovered fresh": admitted(recovered_fresh),
              "recovered during": admitted(recovered_during), "recovered spent": admitted(recovered_spent)}
    report("redis killed", books, admitted_free_probes=probes)
    assert {k: v for k, v in probes.items() if "spent" not in k} == {
        "before": FREE_LIMIT, "degraded fresh": FREE_LIMIT, "recovered fresh": FREE_LIMIT, "recovered during": 0}
    # Across the outage, in one window: never more than limit x (1 + replicas), and the
    # admissions made from memory count once Redis is back (spent: 5 in memory, so 5 left).
    assert probes["degraded spent"] == 5, probes
    assert probes["before"] + probes["degraded spent"] + probes["recovered spent"] == 2 * FREE_LIMIT, probes
    for call in first + degraded_fresh + degraded_spent + recovered_fresh + recovered_during + recovered_spent:
        assert call.kind in ("ok", "http 429 rate_limit_exceeded"), call
    # The load itself: every call on a paid account succeeded; the small accounts ran out (402).
    for call in load.calls:
        if call.account.small:
            assert call.kind in ("ok", "http 402 402"), call
        elif call.account in accounts:
            assert call.kind == "ok", call
