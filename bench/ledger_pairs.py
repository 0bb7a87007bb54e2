"""Hold+settle pairs per second through ledger_svc's real gRPC stubs, against a baseline.

Each of N concurrent callers loops for T seconds: an Envoy-shaped ext_authz
Check (a gRPC-framed chat request, as Envoy sends it after the transcoder),
then the settlement of the hold it got; a pair counts when the ledger has
answered "posted". By default every settlement is its own Settle RPC; with
--settle-batch K the settlements of all callers go through one sender that
puts up to K in a Settle call, as router_svc's settler does. The ledger runs
in its own process on SQLite (a fresh file) and, with --postgres-url, on
PostgreSQL (a fresh schema).
The baseline is the same gRPC server shell with an allow-everything Check and
a Settle that answers "posted" without touching a database, measured in the
same run: the ratio shows what the ledger's work costs on top of gRPC.

Usage:
    .venv/bin/python bench/ledger_pairs.py [--seconds 10] [--concurrency 64] [--accounts 64]
        [--postgres-url postgresql://postgres@127.0.0.1:5432/test] [--skip-sqlite]
        [--settle-batch 1] [--store]

--store adds the same pairs driven straight into SqlStore (its batcher, no
gRPC, in this process): the ledger's own capacity, apart from Python gRPC.
Prints one line per target: pairs/s, p50/p99 of a pair in ms, the ratio to the
baseline, and CPU per pair of the server process (all its threads) and of the
client. The machine is shared by both processes (and PostgreSQL): on two
cores, CPU per pair is the number that predicts capacity.
"""
import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

SECONDS_MAX = 300
CONCURRENCY_MAX = 1024
MODEL = "ref-chat"


def _serve(kind: str, url: str, schema: str | None, data_dir: str, ports) -> None:
    """Child process: runs the ledger (or the baseline) until terminated."""
    os.environ["TOKENS_DATA_DIR"] = data_dir
    os.environ.setdefault("TOKENS_LOG_LEVEL", "WARNING")
    asyncio.run(_serve_async(kind, url, schema, ports))


async def _serve_async(kind: str, url: str, schema: str | None, ports) -> None:
    from common import db, logs, migrate
    from ledger_svc import config, server

    logs.setup("ledger_bench", "WARNING")
    settings = dataclasses.replace(config.Settings.from_env(), database_url=url, database_schema=schema,
                                   server=dataclasses.replace(config.Settings.from_env().server, port=0))
    if kind == "baseline":
        grpc_server, port = _baseline_server(settings)
        await grpc_server.start()
        ports.put(port)
        await asyncio.Event().wait()
    if schema:
        await db.create_schema(url, schema)
    await migrate.upgrade("ledger_svc", url, schema)
    engine = db.make_engine(url, schema=schema)
    store = server.make_store(settings, engine, server.wall_clock_ms)
    await server.seed_prices(settings, store)
    grpc_server, port, _health = server.build_server(settings, store, server.wall_clock_ms)
    await grpc_server.start()
    ports.put(port)
    await asyncio.Event().wait()


def _baseline_server(settings):
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    from common import authz, grpcserver
    from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

    class Allow(external_auth_pb2_grpc.AuthorizationServicer):
        async def Check(self, request, context):
            return authz.allow([authz.header("x-ts-hold", str(uuid.uuid4())), authz.header("x-ts-price", "x=1")])

    class Settle(ledger_pb2_grpc.LedgerServicer):
        async def Settle(self, request, context):
            return ledger_pb2.SettleResponse(results=[ledger_pb2.SettleResult(hold_id=s.hold_id, status="posted")
                                                      for s in request.settlements])

    grpc_server, _health = grpcserver.create(["envoy.service.auth.v3.Authorization", "tokens.ledger.v1.Ledger"])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Allow(), grpc_server)
    ledger_pb2_grpc.add_LedgerServicer_to_server(Settle(), grpc_server)
    return grpc_server, grpcserver.bind(grpc_server, "127.0.0.1", 0)


def check_request(account_id: str, request_id: str):
    """A chat call's Check as Envoy sends it after the transcoder (ledger_svc.testing's builders)."""
    from ledger_svc import testing

    body = testing.frame(testing.chat_request(MODEL, "Say hello in five words.", max_tokens=64))
    return testing.check_request(body, account_id=account_id, key_id="key_bench", request_id=request_id)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Settler:
    """router_svc's shape: settlements from every caller, sent in batches by one task."""

    def __init__(self, ledger, batch_max: int) -> None:
        self._ledger = ledger
        self._batch_max = batch_max
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def settle(self, settlement) -> str:
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((settlement, future))
        return await future

    async def _run(self) -> None:
        from tokens.ledger.v1 import ledger_pb2

        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            response = await self._ledger.Settle(ledger_pb2.SettleRequest(settlements=[s for s, _ in batch]),
                                                 timeout=10)
            for (_, future), result in zip(batch, response.results):
                future.set_result(result.status)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _drive(port: int, seconds: float, concurrency: int, accounts: int, settle_batch: int,
                 open_accounts: bool, server_pid: int) -> dict:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    check = external_auth_pb2_grpc.AuthorizationStub(channel)
    ledger = ledger_pb2_grpc.LedgerStub(channel)
    run = uuid.uuid4().hex[:8]
    account_ids = [f"bench-{run}-{i}" for i in range(accounts)]
    if open_accounts:
        for account_id in account_ids:
            await ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id=account_id))
    requests = [check_request(account_ids[i % accounts], f"req-{run}-{i}") for i in range(concurrency)]
    settler = _Settler(ledger, settle_batch) if settle_batch > 1 else None
    latencies: list[float] = []
    denied = 0
    deadline = 0.0

    async def caller(index: int) -> None:
        nonlocal denied
        request = requests[index]
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            answer = await check.Check(request, timeout=10)
            if not answer.HasField("ok_response"):
                denied += 1
                continue
            hold_id = answer.ok_response.headers[0].header.value
            settlement = ledger_pb2.Settlement(hold_id=hold_id, outcome="completed", request_id=hold_id,
                                               units=ledger_pb2.Units(input_tokens=14, output_tokens=5))
            if settler is None:
                result = await ledger.Settle(ledger_pb2.SettleRequest(settlements=[settlement]), timeout=10)
                status = result.results[0].status
            else:
                status = await settler.settle(settlement)
            assert status == "posted", status
            latencies.append(time.perf_counter() - started)

    # A short warm-up, so connection set-up and first compilations do not count.
    deadline = time.perf_counter() + 0.5
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    latencies.clear()
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    server_cpu, client_cpu = _cpu_s(server_pid), time.process_time()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    server_cpu, client_cpu = _cpu_s(server_pid) - server_cpu, time.process_time() - client_cpu
    if settler is not None:
        await settler.close()
    await channel.close()
    pairs = max(len(latencies), 1)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"pairs": len(latencies), "pairs_s": len(latencies) / elapsed, "p50_ms": quantiles[49] * 1000,
            "p99_ms": quantiles[98] * 1000, "denied": denied, "server_us": server_cpu / pairs * 1e6,
            "client_us": client_cpu / pairs * 1e6}


async def _store_pairs(url: str, schema: str | None, args) -> dict:
    """The same pairs straight into SqlStore (its batcher, no gRPC): the ledger's own capacity."""
    from common import db, migrate, pricing
    from ledger_svc import domain, server, store as store_mod

    if schema:
        await db.create_schema(url, schema)
    await migrate.upgrade("ledger_svc", url, schema)
    engine = db.make_engine(url, schema=schema)
    sql_store = store_mod.SqlStore(engine, server.wall_clock_ms, signup_credit_nanos=10**10,
                                   low_balance_nanos=5 * 10**9, hold_ttl_s=900)
    prices = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}
    await sql_store.seed_prices({MODEL: prices})
    version = sql_store.price_book.current(MODEL, server.wall_clock_ms() // 1000)
    account_ids = [f"store-{i}" for i in range(args.accounts)]
    for account_id in account_ids:
        await sql_store.open_account(account_id, "")
    worst = pricing.cost_nanos(prices, {"input_tokens": 40, "output_tokens": 64})
    latencies: list[float] = []
    deadline = 0.0

    async def caller(index: int) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            decision = await sql_store.hold(domain.HoldRequest(
                os.urandom(16).hex(), account_ids[index % len(account_ids)], "key_bench", MODEL, "req",
                version.prices, version.version, worst))
            [result] = await sql_store.settle([domain.Settlement(decision.hold_id, domain.Units(14, 5),
                                                                 domain.COMPLETED, "req")])
            assert result.status is domain.SettleStatus.POSTED
            latencies.append(time.perf_counter() - started)

    deadline = time.perf_counter() + 0.5
    await asyncio.gather(*(caller(i) for i in range(args.concurrency)))
    latencies.clear()
    deadline = time.perf_counter() + args.seconds
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(i) for i in range(args.concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await sql_store.close()
    await engine.dispose()
    if schema:
        await db.drop_schema(url, schema)
    pairs = max(len(latencies), 1)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"pairs": len(latencies), "pairs_s": len(latencies) / elapsed, "p50_ms": quantiles[49] * 1000,
            "p99_ms": quantiles[98] * 1000, "denied": 0, "server_us": cpu / pairs * 1e6, "client_us": 0.0}


def _measure(kind: str, url: str, schema: str | None, args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as data_dir:
        if url == "sqlite":
            url = f"sqlite:///{data_dir}/ledger.db"
        child = ctx.Process(target=_serve, args=(kind, url, schema, data_dir, ports), daemon=True)
        child.start()
        try:
            port = ports.get(timeout=60)
            return asyncio.run(_drive(port, args.seconds, args.concurrency, args.accounts, args.settle_batch,
                                      open_accounts=kind != "baseline", server_pid=child.pid))
        finally:
            child.terminate()
            child.join(10)
            if schema:
                from common import db

                asyncio.run(db.drop_schema(url, schema))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=0, help="default: one per caller")
    parser.add_argument("--settle-batch", type=int, default=1)
    parser.add_argument("--postgres-url", default=os.environ.get("TOKENS_TEST_POSTGRES_URL", ""))
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--store", action="store_true", help="also drive SqlStore directly, without gRPC")
    args = parser.parse_args(argv)
    args.seconds = min(max(args.seconds, 0.5), SECONDS_MAX)
    args.concurrency = min(max(args.concurrency, 1), CONCURRENCY_MAX)
    args.accounts = min(max(args.accounts or args.concurrency, 1), args.concurrency)
    args.settle_batch = min(max(args.settle_batch, 1), 1000)
    print(f"{args.concurrency} callers, {args.accounts} accounts, {args.seconds:.0f} s each, "
          f"settle batch {args.settle_batch}, {os.cpu_count()} cores")
    baseline = _measure("baseline", "sqlite", None, args)
    _report("baseline (allow-all Check, no-op Settle)", baseline, baseline)
    targets = [] if args.skip_sqlite else [("ledger on SQLite", "sqlite", None)]
    if args.postgres_url:
        targets.append(("ledger on PostgreSQL", args.postgres_url, f"bench_{uuid.uuid4().hex[:10]}"))
    for name, url, schema in targets:
        _report(name, _measure("ledger", url, schema, args), baseline)
    if args.store:
        for name, url, schema in targets:
            with tempfile.TemporaryDirectory(prefix="ledger-bench-") as data_dir:
                if url == "sqlite":
                    url = f"sqlite:///{data_dir}/store.db"
                result = asyncio.run(_store_pairs(url, schema and schema + "_s", args))
            _report(name.replace("ledger", "store alone (no gRPC)"), result, baseline)
    return 0


def _report(name: str, result: dict, baseline: dict) -> None:
    ratio = result["pairs_s"] / baseline["pairs_s"] if baseline["pairs_s"] else 0.0
    print(f"{name:44s} {result['pairs_s']:8.0f} pairs/s  p50 {result['p50_ms']:6.2f} ms  "
          f"p99 {result['p99_ms']:6.2f} ms  {ratio:5.2f}x baseline  ({result['pairs']} pairs, "
          f"{result['denied']} denied; CPU per pair: server {result['server_us']:.0f} us, "
          f"client {result['client_us']:.0f} us)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
