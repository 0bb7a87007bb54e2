"""Non-streamed chat through the whole chain vs. Envoy straight to the backend.

    ./dev bench chain [--seconds 10] [--connections 32]

Starts a mesh on free ports (embedded SQLite and Redis), makes enough Paid keys
that the rate limit never refuses a call, then drives both paths with wrk in the
same run: the baseline (wrk -> Envoy -> reference backend, no filters) and the
chain (wrk -> Envoy -> auth -> ratelimit -> transcoder -> ledger -> router ->
backend, billing and limits on). Throughput at N connections, latency at one
connection, and CPU ms each process spent per request.
"""
import argparse

from bench import harness


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--keys", type=int, default=80)
    args = parser.parse_args(argv)
    with harness.mesh() as mesh:
        keys = harness.paid_keys(mesh, args.keys)
        chain_url = f"{mesh.config.base_url}/v1/chat/completions"
        base_url = f"http://127.0.0.1:{mesh.config.baseline_port}/v1/chat/completions"
        harness.wrk(chain_url, harness.CHAT_BODY, keys, connections=8, seconds=2)  # warm up
        harness.wrk(base_url, harness.CHAT_BODY, [], connections=8, seconds=1)
        runs = []
        for name, url, run_keys, conns in (
                (f"baseline, {args.connections} connections", base_url, [], args.connections),
                (f"chain, {args.connections} connections", chain_url, keys, args.connections),
                ("baseline, 1 connection", base_url, [], 1),
                ("chain, 1 connection", chain_url, keys, 1)):
            result = harness.measured(mesh, lambda: harness.wrk(url, harness.CHAT_BODY, run_keys,
                                                                connections=conns, seconds=args.seconds))
            result.name = name
            runs.append(result)
        print(harness.table(runs[:2], runs[0]))
        print()
        print(harness.table(runs[2:], runs[2]))
        print()
        print(harness.cpu_table(runs))
        added = runs[3].p50_ms - runs[2].p50_ms
        print(f"\nadded by the chain at one connection: p50 {added:.2f} ms, "
              f"p99 {runs[3].p99_ms - runs[2].p99_ms:.2f} ms")


if __name__ == "__main__":
    main()
