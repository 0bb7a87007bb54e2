"""How throughput grows from one replica of each service to two.

    ./dev bench scaling [--seconds 4] [--rounds 2] [--connections 32] [--keys 80]
                        [--postgres-url URL [--redis-url URL]]

Starts two meshes on free ports, both up at once, the same but for the replica
count: one replica of each service (auth, ratelimit, ledger, router), and two
(Envoy balancing each cluster over both). wrk drives the whole chain of each with
non-streamed chat at --connections, in --rounds that alternate which goes first;
the one-replica mesh is the baseline. It prints calls/s, the ratio, and the CPU
ms per call of every process (the replicas of a service summed).

By default both meshes run on the embedded stores, where two ledger replicas take
turns on one SQLite file's write lock. With --postgres-url (and --redis-url) they run
the production shape instead: every SQL service on PostgreSQL, each mesh in schemas
of its own (created and dropped here), and the rate limits on that Redis.

The machine's cores bound what a second replica can add: wrk, Envoy, the
reference backend, Redis and every replica share them, and a Python service
uses one core at most; read the CPU per call alongside the calls/s.
"""
import contextlib
import sys

from bench import harness, throughput


def table(r1: harness.Result, r2: harness.Result) -> str:
    cpu1, cpu2 = sum(r1.cpu_ms_per_request.values()), sum(r2.cpu_ms_per_request.values())
    lines = ["| run | req/s | p50 ms | p99 ms | errors | non-2xx | req/s vs 1 replica | CPU ms per call |",
             "|---|---|---|---|---|---|---|---|"]
    for r, cpu in ((r1, cpu1), (r2, cpu2)):
        lines.append(f"| {r.name} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {r.non2xx} | "
                     f"{r.rps / r1.rps:.2f} | {cpu:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = throughput.parse(sys.argv[1:] if argv is None else argv, "./dev bench scaling", __doc__)
    harness.need_wrk()
    with contextlib.ExitStack() as stack:
        targets = []
        for replicas in (1, 2):
            settings = stack.enter_context(harness.stores(args.postgres_url, args.redis_url))
            mesh = stack.enter_context(harness.mesh(replicas=replicas, **settings))
            keys = harness.paid_keys(mesh, args.keys)
            targets.append(throughput.LoadTarget(f"chain, {replicas} replica{'s' if replicas > 1 else ''}",
                                                 mesh, throughput.chain_url(mesh), keys))
        throughput.warm_up(targets)
        results = throughput.load_rounds(targets, seconds=args.seconds, connections=args.connections,
                                         rounds=args.rounds)
    rows = [results[t.name] for t in targets]
    print(f"non-streamed chat through the whole chain on {harness.stores_named(args)}, "
          f"wrk at {args.connections} connections, {args.rounds} round(s) of {args.seconds:g} s per row\n")
    print(table(*rows))
    print()
    print(throughput.cpu_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
