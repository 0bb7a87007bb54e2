"""What idling costs on this machine: the same work, back to back and after a pause.

    ./dev bench idle [--gap-ms 20] [--count 300]

Times three fixed pieces of work, one after another with no pause, then each after
sleeping --gap-ms (20 ms is the gap between calls at 50 calls/s):
  python  the same JSON encode/decode of a chat body, 30 times over, in this process;
  hold    one ledger hold in this process (SqlStore.hold on a fresh SQLite file: the
          batcher, the domain rules, one transaction);
  grpc    one unary call of 300 bytes from a grpc.aio channel here (gRPC's default
          settings: ./dev loaded grpc before this module) to a grpc.aio server that
          only echoes it, in a process of its own started the way every service starts
          (common.runtime: uvloop, the same GRPC_EXPERIMENTS): one hop of the chain
          with no work in it, its client included.
The first two wait on no other thread. On a virtual machine whose idle vCPUs halt
(haltpoll), work after a pause runs on cold caches and a woken thread waits for its
vCPU; the ratio is that penalty. Every hop of the chain pays it at a low call rate,
which is why ./dev bench openloop (50 calls/s) adds more than ./dev bench chain's
one-connection run (back to back).
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GAP_MS_MAX = 1000.0
SERVE_S_MAX = 600.0  # the echo server's own bound, should its parent die without killing it
COUNT_MAX = 5000
CHAT = {"model": "ref-chat", "messages": [{"role": "user", "content": "Say something short."}] * 5, "max_tokens": 16}


async def _serve_echo(port: int) -> None:
    import grpc

    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Idle", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination(timeout=SERVE_S_MAX)


def python_work() -> None:
    for _ in range(30):
        json.loads(json.dumps(CHAT))


async def timed(work, count: int, gap_s: float) -> float:
    """p50 seconds of `work` (a coroutine function), each run after sleeping gap_s."""
    times = []
    for _ in range(count):
        if gap_s:
            await asyncio.sleep(gap_s)
        started = time.perf_counter()
        await work()
        times.append(time.perf_counter() - started)
    return statistics.median(times[count // 10:])  # the first tenth warms up


async def measure(gap_s: float, count: int) -> list[tuple[str, float, float]]:
    from common import db, migrate
    from ledger_svc import domain, server, store as store_mod

    async def python() -> None:
        python_work()

    with tempfile.TemporaryDirectory(prefix="tokens-idle-") as tmp:
        url = f"sqlite:///{tmp}/ledger.db"
        await migrate.upgrade("ledger_svc", url)
        engine = db.make_engine(url)
        store = store_mod.SqlStore(engine, server.wall_clock_ms, signup_credit_nanos=10**12,
                                   low_balance_nanos=0, hold_ttl_s=900, batch_linger_ms=0)
        prices = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}
        await store.seed_prices({"ref-chat": prices})
        version = store.price_book.current("ref-chat", server.wall_clock_ms() // 1000)
        await store.open_account("acct_idle", "")

        async def hold() -> None:
            await store.hold(domain.HoldRequest(os.urandom(16).hex(), "acct_idle", "key_idle", "ref-chat", "req",
                                                version.prices, version.version, 1000))

        rows = []
        try:
            for name, work in (("python", python), ("hold", hold)):
                rows.append((name, await timed(work, count, 0.0), await timed(work, count, gap_s)))
        finally:
            await store.close()
            await engine.dispose()
    rows.append(("grpc", *await _grpc_hop(gap_s, count)))
    return rows


async def _grpc_hop(gap_s: float, count: int) -> tuple[float, float]:
    import grpc

    from bench import harness

    [port] = harness.free_ports(1)
    child = subprocess.Popen([sys.executable, "-m", "bench.idle", "--serve", str(port)], stdin=subprocess.DEVNULL)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 15)
            echo = channel.unary_unary("/bench.Idle/Echo")
            payload = b"x" * 300

            async def call() -> None:
                await echo(payload, timeout=5, wait_for_ready=True)

            return await timed(call, count, 0.0), await timed(call, count, gap_s)
    finally:
        child.kill()
        child.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench idle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gap-ms", type=float, default=20.0, help="pause before each run (default 20)")
    parser.add_argument("--count", type=int, default=300, help="runs of each kind (default 300)")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the grpc row's server
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 < args.gap_ms <= GAP_MS_MAX or not 20 <= args.count <= COUNT_MAX:
        parser.error(f"--gap-ms must be in (0, {GAP_MS_MAX:g}] and --count in [20, {COUNT_MAX}]")
    import uvloop

    rows = uvloop.run(measure(args.gap_ms / 1000, args.count))
    print(f"| work | back to back, p50 us | after {args.gap_ms:g} ms idle, p50 us | ratio |")
    print("|---|---|---|---|")
    for name, warm, cold in rows:
        print(f"| {name} | {warm * 1e6:.0f} | {cold * 1e6:.0f} | {cold / warm:.2f} |")
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv:  # the grpc row's echo server, started the way every service starts
        from common import runtime

        runtime.run(_serve_echo(int(sys.argv[sys.argv.index("--serve") + 1])))
        sys.exit(0)
    sys.exit(main())
