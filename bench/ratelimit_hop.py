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

MESHES = {"with": frozenset(), "without": frozenset({"authz_ratelimit"})}
# No wrk run lasts longer than this, whatever the arguments.
SECONDS_MAX = 30.0
DECISIONS_ARGS = ["--seconds", "3", "--rounds", "3"]
DECISIONS_TIMEOUT_S = 300


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./dev bench ratelimit_hop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="connections of the throughput runs (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations between the meshes (default 2)")
    parser.add_argument("--keys", type=int, default=200, help="Paid keys per mesh (default 200)")
    parser.add_argument("--decisions", action="store_true",
                        help="then run bench.ratelimit_decisions " + " ".join(DECISIONS_ARGS))
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= SECONDS_MAX:
        parser.error(f"--seconds must be in (0, {SECONDS_MAX:g}]")
    if not 1 <= args.connections <= 256 or not 1 <= args.rounds <= 10 or not 1 <= args.keys <= 2000:
        parser.error("--connections must be 1..256, --rounds 1..10, --keys 1..2000")
    return args


def report(results: dict[tuple[str, int], harness.Result], connections: int) -> None:
    loaded = [results["without", connections], results["with", connections]]
    alone = [results["without", 1], results["with", 1]]
    print(harness.table(loaded, loaded[0]))
    print()
    print(harness.table(alone, alone[0]))
    print()
    print(harness.cpu_table(loaded + alone))
    with_, without = results["with", 1], results["without", 1]
    print(f"\nadded by the ratelimit hop at one connection: p50 {with_.p50_ms - without.p50_ms:+.2f} ms, "
          f"p99 {with_.p99_ms - without.p99_ms:+.2f} ms")
    with_, without = results["with", connections], results["without", connections]
    print(f"throughput at {connections} connections: {with_.rps:.0f} vs {without.rps:.0f} req/s "
          f"({with_.rps / without.rps - 1:+.1%})")
    cpu, cpu_without = with_.cpu_ms_per_request, without.cpu_ms_per_request
    ratelimit = sum(v for k, v in cpu.items() if k.startswith("ratelimit_svc#"))
    envoy_delta = cpu.get("envoy", 0) - cpu_without.get("envoy", 0)
    total_delta = sum(cpu.values()) - sum(cpu_without.values())
    print(f"CPU per request at {connections} connections: ratelimit_svc {ratelimit:.3f} ms, "
          f"redis {cpu.get('redis', 0):.3f} ms, envoy {envoy_delta:+.3f} ms, "
          f"every process together {total_delta:+.3f} ms")
    bad = [r.name for r in results.values() if r.errors or r.non2xx]
    if bad:
        print(f"\nWARNING: these runs had errors or non-2xx replies, so they do not measure what they claim: "
              f"{', '.join(bad)} (more --keys if the replies were 429s)")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as stack:
        meshes, keys = {}, {}
        for kind, without in MESHES.items():
            meshes[kind] = stack.enter_context(harness.mesh(envoy_without=without))
            keys[kind] = harness.paid_keys(meshes[kind], args.keys)
        for kind, mesh in meshes.items():  # warm up, unmeasured
            harness.wrk(f"{mesh.config.base_url}/v1/chat/completions", harness.CHAT_BODY, keys[kind],
                        connections=8, seconds=2)
        print(f"non-streamed chat (max_tokens {harness.CHAT_BODY['max_tokens']}), {args.rounds} rounds of "
              f"{args.seconds:g} s per row, {args.keys} Paid keys per mesh\n")
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
