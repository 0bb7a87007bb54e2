"""What the ledger hop adds to a non-streamed chat call through the whole chain.

    ./dev bench ledger_hop [--seconds 3] [--connections 32] [--rounds 2] [--keys 200]
                           [--postgres-url URL] [--no-pairs]

Starts two meshes on free ports, one after the other, with the same settings
(one replica of each service, embedded SQLite and Redis, a baseline listener):
  with      the whole chain, Envoy -> auth -> ratelimit -> transcoder -> ledger
            (hold the worst case, or 402) -> router (settles each call with the
            ledger, batched) -> reference backend;
  without   the same, with Envoy's authz_ledger filter left out and router_svc
            told to run calls no hold covers (TOKENS_ALLOW_UNHELD_CALLS_FOR_BENCHMARKS,
            loudly logged: benchmarks only). No hold, no settlement: the hop is gone.
Both stay up, and wrk drives them in --rounds that alternate which goes first, so
that load from elsewhere on the machine falls on both alike: throughput at
--connections, then latency at one connection, each run --seconds long, with the
CPU ms per request of every process (ledger_svc among them). Paid keys keep
every call under its limit; any non-2xx reply is reported, since such a run
would not measure what it claims.

Then, unless --no-pairs, once both meshes have stopped: bench/ledger_pairs.py,
hold+settle pairs per second of one ledger_svc process on SQLite and on
PostgreSQL (--postgres-url; default TOKENS_TEST_POSTGRES_URL or the local
server), against its allow-all baseline.
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time

from bench import harness
from devtool import admin as admin_cli

MESHES = {
    "with": {},
    "without": {"envoy_without": frozenset({"authz_ledger"}),
                "extra_env": {"TOKENS_ALLOW_UNHELD_CALLS_FOR_BENCHMARKS": "1"}},
}
POSTGRES_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
PAIRS_SECONDS = "3"
PAIRS_TIMEOUT_S = 300


def parse(argv: list[str]) -> argparse.Namespace:
    parser = harness.hop_parser("./dev bench ledger_hop", __doc__, 3.0)
    parser.add_argument("--postgres-url", default=os.environ.get("TOKENS_TEST_POSTGRES_URL") or POSTGRES_URL_DEFAULT,
                        help="PostgreSQL for bench/ledger_pairs.py (empty: SQLite only)")
    parser.add_argument("--no-pairs", action="store_true", help="skip bench/ledger_pairs.py")
    return harness.hop_args(parser, argv)


def journal(mesh) -> dict[str, int]:
    """`./dev admin stats` of a mesh's ledger (proto3 JSON leaves zeros out)."""
    os.environ["TOKENS_DATA_DIR"] = str(mesh.config.data_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        admin_cli.main(["stats"])
    stats = json.loads(out.getvalue())
    return {k: int(stats.get(k, 0)) for k in ("transfers", "pending_holds", "sum_of_balances_nanos")}


def report(results: dict[tuple[str, int], harness.Result], connections: int) -> None:
    with_, without = harness.hop_report(results, connections, "ledger")
    cpu, cpu_without = with_.cpu_ms_per_request, without.cpu_ms_per_request
    router_delta = harness.cpu_of(cpu, "router_svc") - harness.cpu_of(cpu_without, "router_svc")
    print(f"CPU per request at {connections} connections: ledger_svc {harness.cpu_of(cpu, 'ledger_svc'):.3f} ms, "
          f"router_svc {router_delta:+.3f} ms (settling), envoy {cpu.get('envoy', 0) - cpu_without.get('envoy', 0):+.3f} "
          f"ms, every process together {sum(cpu.values()) - sum(cpu_without.values()):+.3f} ms")


def pairs(args: argparse.Namespace) -> None:
    command = [sys.executable, "bench/ledger_pairs.py", "--seconds", PAIRS_SECONDS]
    if args.postgres_url:
        command += ["--postgres-url", args.postgres_url]
    print(f"\nhold+settle pairs/s of one ledger_svc (no Envoy): {' '.join(command[1:])}\n", flush=True)
    subprocess.run(command, cwd=harness.ROOT, check=True, timeout=PAIRS_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as stack:
        meshes, keys = harness.hop_meshes(stack, MESHES, args.keys)
        before = {kind: journal(mesh) for kind, mesh in meshes.items()}
        results = harness.run_rounds(meshes, keys, label="ledger", rounds=args.rounds,
                                     connections=args.connections, seconds=args.seconds)
        time.sleep(1.0)  # the last settlements land
        after = {kind: journal(mesh) for kind, mesh in meshes.items()}
    report(results, args.connections)
    # The hop did what it is measured for: every call with it was held and settled, none without.
    for kind in meshes:
        calls = sum(r.requests for (k, _), r in results.items() if k == kind)
        print(f"journal, {kind} ledger: {after[kind]['transfers'] - before[kind]['transfers']} transfers for "
              f"{calls} calls, {after[kind]['pending_holds']} holds pending (calls wrk dropped at its end: "
              f"they lapse after TOKENS_HOLD_CLAIM_S), "
              f"sum of balances {after[kind]['sum_of_balances_nanos']}")
    if not args.no_pairs:
        pairs(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
