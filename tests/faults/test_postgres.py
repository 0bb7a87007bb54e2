"""PostgreSQL connections dropped under load, a few times over.

A mesh on PostgreSQL (a schema per service, as in production) and a separate
connection that terminates the services' server processes, as a database
failover or restart does. Only this mesh's connections are terminated: the
test database is shared with other runs, so the terminating query is narrowed
to the client ports of this mesh's processes.

The services recover by themselves (pooled connections are pinged before use;
ledger_svc's batch connection is replaced after a failed batch; router_svc's
outbox keeps settlements the ledger could not take). A call caught by a drop
gets a documented error at worst (503, or 500 from a store error, in OpenAI's
shape), within its bound, and afterwards the books hold.
"""
import asyncio
import time

import asyncpg
import psutil
import pytest

from devtool import up
from tests.e2e.conftest import POSTGRES_URL
from tests.faults.conftest import (Load, backend_stats, check_books, journal, open_accounts,
                                   report, running_mesh, usage_rows, wait_until)

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(120)]
DROPS = 4
DROP_EVERY_S = 1.2
HOLD_TTL_S = 6
TERMINATE = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
             "AND pid <> pg_backend_pid() AND usename = current_user AND client_port = ANY($1::int[])")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if not POSTGRES_URL:
        pytest.skip("set TOKENS_TEST_POSTGRES_URL to run the PostgreSQL fault test")
    with up.postgres_settings(POSTGRES_URL, "faults") as settings:
        with running_mesh(tmp_path_factory.mktemp("faults-postgres"), timeout_s=90, **settings,
                          env_of={"ledger_svc": {"TOKENS_HOLD_TTL_S": str(HOLD_TTL_S)}}) as mesh:
            yield mesh


def client_ports(mesh) -> list[int]:
    """Local ports of this mesh's connections to PostgreSQL."""
    ports = []
    for name, proc in mesh.procs.items():
        if "_svc#" not in name or proc.poll() is not None:
            continue
        for conn in psutil.Process(proc.pid).net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == 5432 and conn.raddr.ip == "127.0.0.1":
                ports.append(conn.laddr.port)
    return ports


async def drop_connections(mesh) -> int:
    ports = client_ports(mesh)
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        return len(await conn.fetch(TERMINATE, ports))
    finally:
        await conn.close()


async def test_postgres_connections_dropped_under_load(mesh):
    accounts = await open_accounts(mesh, paid=6, small=2)
    backend_before = (await backend_stats(mesh))["requests"]
    dropped = []
    load = Load(mesh.config.base_url, accounts, clients=12)
    async with load:
        await asyncio.sleep(1.5)
        for _ in range(DROPS):
            dropped.append(await drop_connections(mesh))
            await asyncio.sleep(DROP_EVERY_S)
        last_drop_done = time.monotonic()
        await asyncio.sleep(1.5)
    assert all(n > 0 for n in dropped), dropped

    calls = load.calls
    # Recovered by itself: the calls of the last stretch, after the drops, all went through.
    late = [c for c in calls if c.started > last_drop_done + 0.5]
    assert late and all(c.kind in ("ok", "http 402 402") for c in late), [c.kind for c in late]
    # No hang: every call ended well within its bound.
    assert max(c.ended - c.started for c in calls) < 10

    async def settled():
        rows = sum([len(await usage_rows(mesh, a.account_id)) for a in accounts])
        return rows == (await backend_stats(mesh))["requests"] - backend_before

    await wait_until(settled, 30, "every call the backend served settled", every_s=0.5)

    async def released():
        return (await journal(mesh)).pending_holds == 0

    # A hold committed just as its connection dropped (the ledger answered 503) waits for its expiry.
    await wait_until(released, HOLD_TTL_S + 10, "no hold left pending", every_s=0.5)
    books = await check_books(mesh, accounts, calls, backend_before=backend_before, also_statuses=frozenset({500}))
    report("postgres connections dropped", books, drops=DROPS, backends_terminated=dropped)
    for call in calls:
        assert call.kind in ("ok", "http 402 402", "http 503 service_unavailable", "http 500 internal_error"), call
