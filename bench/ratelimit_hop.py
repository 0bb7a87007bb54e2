"""What the ratelimit hop adds to a non-streamed chat call through the whole chain.

    ./dev bench ratelimit_hop [--seconds 5] [--connections 32] [--rounds 2] [--keys 200] [--decisions]

Starts two meshes on free ports, one after the other, with the same settings
(one replica of each service, embedded SQLite and Redis, a baseline listener):
  with      the whole chain, Envoy -> auth -> ratelimit -> transcoder -> ledger ->
            router -> reference backend;
  without   the same, with Envoy's authz_ratelimit filter left out.
Both stay up, and wrk drives them in --rounds that alternate which goes first, so
that load from elsewhere on the machine falls on both alike: throughput at
--connections, then latency at one connection, each run --seconds long, with the
CPU ms per request of every process (ratelimit_svc and redis among them). Paid
keys keep every call under its limit; any non-2xx reply is reported, since such
a run would not measure what it claims.

How many decisions one ratelimit replica makes per second against Redis, with no
Envoy in front, is bench/ratelimit_decisions.py (./dev bench ratelimit_decisions);
--decisions runs it here once both meshes have stopped.
"""
import argparse
import contextlib
import subprocess
import sys

from bench import harness

MESHES = {"with": {}, "without": {"envoy_without": frozenset({"authz_ratelimit"})}}
DECISIONS_ARGS = ["--seconds", "3", "--rounds", "3"]
DECISIONS_TIMEOUT_S = 300


def parse(argv: list[str]) -> argparse.Namespace:
    parser = harness.hop_parser("./dev bench ratelimit_hop", __doc__, 5.0)
    parser.add_argument("--decisions", action="store_true",
                        help="then run bench.ratelimit_decisions " + " ".join(DECISIONS_ARGS))
    return harness.hop_args(parser, argv)


def report(results: dict[tuple[str, int], harness.Result], connections: int) -> None:
    with_, without = harness.hop_report(results, connections, "ratelimit")
    cpu, cpu_without = with_.cpu_ms_per_request, without.cpu_ms_per_request
    print(f"CPU per request at {connections} connections: ratelimit_svc {harness.cpu_of(cpu, 'ratelimit_svc'):.3f} "
          f"ms, redis {cpu.get('redis', 0):.3f} ms, envoy {cpu.get('envoy', 0) - cpu_without.get('envoy', 0):+.3f} ms, "
          f"every process together {sum(cpu.values()) - sum(cpu_without.values()):+.3f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as stack:
        meshes, keys = harness.hop_meshes(stack, MESHES, args.keys)
        results = harness.run_rounds(meshes, keys, label="ratelimit", rounds=args.rounds,
                                     connections=args.connections, seconds=args.seconds)
    report(results, args.connections)
    print("\ndecisions/s of one ratelimit replica against Redis (no Envoy): ./dev bench ratelimit_decisions")
    if args.decisions:
        print(f"running: python -m bench.ratelimit_decisions {' '.join(DECISIONS_ARGS)}\n", flush=True)
        subprocess.run([sys.executable, "-m", "bench.ratelimit_decisions", *DECISIONS_ARGS],
                       cwd=harness.ROOT, check=True, timeout=DECISIONS_TIMEOUT_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
