"""The chain against its own floor: the same shape with the services' logic taken out.

    ./dev bench floor [--seconds 4] [--rounds 2] [--connections 32] [--keys 80]

Starts two meshes on free ports, both up at once:
  chain  the whole chain as it runs (wrk -> Envoy -> auth -> ratelimit -> transcoder
         -> ledger -> router -> reference backend; the router settles with the ledger);
  floor  the same Envoy, router and backend, but auth_svc, ratelimit_svc and
         ledger_svc each sit behind a stand-in on their port (bench/standin.py):
         the same gRPC shell, answering every Check for a key with the real
         service's first answer, and the ledger's Settle without a database.
wrk drives non-streamed chat through both at --connections and then at one
connection, in --rounds that alternate which goes first; then calls at a fixed
--rate (open loop, as ./dev bench openloop) go to both and to the baseline
listener (Envoy straight to the backend). The floor is what this
shape costs on this machine when auth, ratelimit and ledger do no work at all:
Envoy's three ext_authz hops and the transcoder, three Python gRPC hops, the
router and the backend. The gap between the rows is the services' own work.
"""
import contextlib
import sys

from bench import harness, openloop, throughput
from devtool import up

STANDING_IN = ("auth_svc", "ratelimit_svc", "ledger_svc")


def put_stand_ins(mesh: up.Mesh) -> None:
    """Moves each service of STANDING_IN to a free port and starts its stand-in on the old one."""
    c = mesh.config
    taken = set(mesh._ports().values())
    moved = [p for p in up.free_ports(len(STANDING_IN) + len(taken)) if p not in taken][:len(STANDING_IN)]
    for service, port in zip(STANDING_IN, moved):
        mesh.stop_one(f"{service}#0")
        env = mesh.service_env(service, 0)
        env["TOKENS_GRPC_PORT"] = str(port)
        mesh._spawn(f"{service}#0", [sys.executable, "-m", service], env)
        mesh._wait_tcp(port, service, 30)
        argv = [sys.executable, "-m", "bench.standin", "--port", str(c.grpc_port(service, 0)),
                "--upstream", f"127.0.0.1:{port}"]
        if service == "ledger_svc":
            argv.append("--settle")
        # Named like a replica so that Mesh.stop stops it too.
        mesh._spawn(f"stand-in {service}#0", argv, env)
    mesh.wait_healthy(60)


def main(argv: list[str] | None = None) -> int:
    args = throughput.parse(sys.argv[1:] if argv is None else argv, "./dev bench floor", __doc__, stores=False,
                            rate=True)
    harness.need_wrk()
    with contextlib.ExitStack() as stack:
        targets = []
        for name in ("chain", "floor"):
            mesh = stack.enter_context(harness.mesh())
            if name == "floor":
                put_stand_ins(mesh)
            targets.append(throughput.LoadTarget(name, mesh, throughput.chain_url(mesh),
                                                 harness.paid_keys(mesh, args.keys)))
        throughput.warm_up(targets)
        rows = []
        for connections in (args.connections, 1):
            results = throughput.load_rounds(targets, seconds=args.seconds, connections=connections,
                                             rounds=args.rounds)
            for t in targets:
                results[t.name].name = f"{t.name}, {connections} connection{'s' if connections > 1 else ''}"
                rows.append(results[t.name])
        chain_mesh = targets[0].mesh
        fixed = openloop.chat_targets(chain_mesh, targets[0].keys)
        fixed.append(openloop.Target("floor", targets[1].url, harness.CHAT_BODY, targets[1].keys))
        latency = openloop.run(fixed, rate=args.rate, seconds=args.seconds, rounds=args.rounds)
    print(f"non-streamed chat, wrk, {args.rounds} round(s) of {args.seconds:g} s per row; the floor's "
          "auth, ratelimit and ledger are stand-ins that do no work\n")
    print(harness.table(rows[:2], rows[1]).replace("req/s vs baseline", "req/s vs floor"))
    print()
    print(harness.table(rows[2:], rows[3]).replace("req/s vs baseline", "req/s vs floor"))
    print()
    print(throughput.cpu_table(rows))
    chain, floor = (sum(r.cpu_ms_per_request.values()) for r in rows[:2])
    print(f"\nthe services' own work at {args.connections} connections: {chain - floor:.3f} ms CPU per call "
          f"({chain:.3f} vs {floor:.3f}); at one connection it adds {rows[2].p50_ms - rows[3].p50_ms:.2f} ms "
          "to the p50")
    print(f"\nat a fixed {args.rate:g} calls/s (open loop), against the baseline listener (Envoy straight to "
          "the backend):\n")
    print(openloop.table(latency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
