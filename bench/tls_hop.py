"""What mutual TLS costs one hop: the same do-nothing gRPC call in plaintext and over mTLS.

    ./dev bench tls_hop [--seconds 5] [--callers 16] [--rounds 3]

Two echo servers, each in a process of its own started the way every service starts
(common.runtime, common.grpcserver's shell): one bound in plaintext, one with the
mesh's mutual TLS (certificates made by devtool.certs for this run). A grpc.aio client
here drives each in turn, --rounds times alternately so that what else the machine does
falls on both alike: --callers concurrent callers for --seconds (calls a second, and CPU
per call of the server and this client together), then one caller back to back (p50).
A call of the chain crosses five such hops (Envoy to auth, ratelimit, ledger and router;
router to ledger for the settlement, batched), Envoy's side in BoringSSL, not Python.
"""
import argparse
import asyncio
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

SERVE_S_MAX = 900.0  # the echo servers' own bound, should their parent die without killing them
PAYLOAD = b"x" * 300


async def _serve(port: int, tls_dir: str) -> None:
    import grpc

    from common import grpcserver, tls

    async def echo(request: bytes, context) -> bytes:
        return request

    server, _health = grpcserver.create([])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Hop", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    grpcserver.bind(server, "127.0.0.1", port, tls.Files.in_dir(tls_dir, "service") if tls_dir else None)
    await server.start()
    await server.wait_for_termination(timeout=SERVE_S_MAX)


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _load(echo, callers: int, seconds: float) -> int:
    done = 0
    deadline = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await echo(PAYLOAD, timeout=5)
            done += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return done


async def _latency(echo, count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await echo(PAYLOAD, timeout=5)
        times.append(time.perf_counter() - started)
    return statistics.median(times[count // 10:])


async def measure(seconds: float, callers: int, rounds: int) -> dict[str, list[tuple[float, float, float]]]:
    import grpc

    from bench import harness
    from common import clients, tls
    from devtool import certs

    results: dict[str, list[tuple[float, float, float]]] = {"plaintext": [], "mutual TLS": []}
    with tempfile.TemporaryDirectory(prefix="tokens-tls-hop-") as tls_dir:
        certs.make(pathlib.Path(tls_dir))
        ports = harness.free_ports(2)
        kinds = {"plaintext": (ports[0], ""), "mutual TLS": (ports[1], tls_dir)}
        children = {kind: subprocess.Popen([sys.executable, "-m", "bench.tls_hop", "--serve", str(port), where or "-"],
                                           stdin=subprocess.DEVNULL) for kind, (port, where) in kinds.items()}
        try:
            channels = {kind: clients.channel(f"127.0.0.1:{port}",
                                              tls.Files.in_dir(where, "operator") if where else None)
                        for kind, (port, where) in kinds.items()}
            for channel in channels.values():
                await asyncio.wait_for(channel.channel_ready(), 15)
            echoes = {kind: channel.unary_unary("/bench.Hop/Echo") for kind, channel in channels.items()}
            for echo in echoes.values():
                await _load(echo, callers, 1.0)  # warm up
            for _ in range(rounds):
                for kind, echo in echoes.items():
                    server = psutil.Process(children[kind].pid)
                    cpu_before = _cpu_s(server) + _own_cpu_s()
                    calls = await _load(echo, callers, seconds)
                    cpu_us = (_cpu_s(server) + _own_cpu_s() - cpu_before) / calls * 1e6
                    results[kind].append((calls / seconds, cpu_us, await _latency(echo, 500) * 1e6))
            for channel in channels.values():
                await channel.close()
        except grpc.aio.AioRpcError as error:
            raise SystemExit(f"the echo call failed: {error.code().name} {error.details()}") from None
        finally:
            for child in children.values():
                child.kill()
                child.wait(timeout=10)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench tls_hop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "TLS_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.seconds <= 60 or not 1 <= args.callers <= 256 or not 1 <= args.rounds <= 10:
        parser.error("--seconds must be in [1, 60], --callers in [1, 256], --rounds in [1, 10]")
    import uvloop

    results = uvloop.run(measure(args.seconds, args.callers, args.rounds))
    print(f"| hop | calls/s, {args.callers} callers | CPU us per call (server + client) | p50 us, 1 caller |")
    print("|---|---|---|---|")
    medians = {}
    for kind, rows in results.items():
        medians[kind] = [statistics.median(column) for column in zip(*rows)]
        rate, cpu, p50 = medians[kind]
        each = ", ".join(f"{r:.0f}" for r, _c, _p in rows)
        print(f"| {kind} | {rate:.0f} ({each}) | {cpu:.0f} | {p50:.0f} |")
    (rate0, cpu0, p500), (rate1, cpu1, p501) = medians["plaintext"], medians["mutual TLS"]
    print(f"\nmutual TLS vs plaintext, medians of {args.rounds} rounds: calls/s x{rate1 / rate0:.2f}, "
          f"CPU per call {cpu1 - cpu0:+.0f} us, p50 {p501 - p500:+.0f} us")
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv:  # an echo server, started the way every service starts
        from common import runtime

        at = sys.argv.index("--serve")
        runtime.run(_serve(int(sys.argv[at + 1]), "" if sys.argv[at + 2] == "-" else sys.argv[at + 2]))
        sys.exit(0)
    sys.exit(main())
