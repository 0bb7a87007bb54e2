"""Issue 7's benchmarks in one go, each figure against a baseline measured in the same run.

    ./dev bench suite [--seconds 4] [--rounds 2] [--connections 32] [--rate 50] [--openloop-seconds 5]
                      [--stream-rate 25] [--token-delay-ms 20] [--keys 80] [--no-scaling]

Two meshes on free ports, on loopback only (embedded SQLite and Redis, billing
and limits on): A with one replica of each service and a baseline listener
(Envoy straight to the reference backend), B with two replicas of each service.
  1. load: wrk at --connections against A's baseline, A's chain and B's chain, in
     --rounds that rotate who goes first, --seconds each: calls/s and CPU ms per
     call of every process (./dev bench throughput, ./dev bench scaling), with
     the RSS of every process sampled every 50 ms all along (./dev bench memory);
  2. B stops; added latency on A at a fixed --rate, open loop (bench/openloop.py:
     calls due on a fixed schedule, latency from the due time, so there is no
     coordinated omission), baseline vs chain alternating every second
     (./dev bench openloop);
  3. streamed time to first token on A, open loop at --stream-rate, with the
     backend pausing --token-delay-ms between tokens (./dev bench ttft).
Then a markdown summary with the command that reproduces each row on its own,
and the detail tables. About two minutes with the defaults.
"""
import argparse
import contextlib
import os
import sys
import time

from bench import harness, memory, openloop, scaling, throughput, ttft

TARGET_RPS = 600
TARGET_ADDED_P50_MS = 5.0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./dev bench suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every comparison (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--rate", type=float, default=50.0, help="open-loop calls/s for added latency (default 50)")
    parser.add_argument("--openloop-seconds", type=float, default=5.0, help="seconds per open-loop run (default 5)")
    parser.add_argument("--stream-rate", type=float, default=25.0, help="open-loop streams/s for TTFT (default 25)")
    parser.add_argument("--token-delay-ms", type=int, default=20, help="backend pause between tokens (default 20)")
    parser.add_argument("--keys", type=int, default=80, help="Paid keys per mesh (default 80)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the two-replica mesh")
    harness.add_store_args(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= throughput.SECONDS_MAX or not 0 < args.openloop_seconds <= openloop.SECONDS_MAX:
        parser.error(f"--seconds and --openloop-seconds must be at most {throughput.SECONDS_MAX:g}")
    if not 0 < args.rate <= openloop.RATE_MAX or not 0 < args.stream_rate <= openloop.RATE_MAX:
        parser.error(f"--rate and --stream-rate must be in (0, {openloop.RATE_MAX:g}]")
    if not 1 <= args.connections <= 256 or not 1 <= args.rounds <= 10 or not 1 <= args.keys <= 2000:
        parser.error("--connections must be 1..256, --rounds 1..10, --keys 1..2000")
    if not 0 <= args.token_delay_ms <= ttft.TOKEN_DELAY_MAX_MS:
        parser.error(f"--token-delay-ms must be 0..{ttft.TOKEN_DELAY_MAX_MS}")
    return args


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def summary(args, load: dict, sampler: memory.RssSampler, latency: dict, streams: dict) -> str:
    where = "".join(f" --{flag}-url {value}" for flag, value in (("postgres", args.postgres_url),
                                                                 ("redis", args.redis_url)) if value)
    wrk_args = f"--seconds {args.seconds:g} --rounds {args.rounds} --connections {args.connections}{where}"
    cmd_tp = f"`./dev bench throughput {wrk_args}`"
    cmd_mem = f"`./dev bench memory {wrk_args}`"
    cmd_sc = f"`./dev bench scaling {wrk_args}`"
    cmd_ol = (f"`./dev bench openloop --rate {args.rate:g} --seconds {args.openloop_seconds:g} "
              f"--rounds {args.rounds}{where}`")
    cmd_tt = (f"`./dev bench ttft --rate {args.stream_rate:g} --seconds {args.openloop_seconds:g} "
              f"--rounds {args.rounds} --token-delay-ms {args.token_delay_ms}{where}`")
    base, chain = load["baseline"], load["chain"]
    rows = ["| figure | baseline | measured | vs baseline | target | met | command |",
            "|---|---|---|---|---|---|---|"]
    rows.append(f"| non-streamed chat calls/s, whole chain, wrk {args.connections} connections (baseline: Envoy "
                f"straight to the backend) | {base.rps:.0f} | {chain.rps:.0f} | {chain.rps / base.rps:.2f}x | "
                f">= {TARGET_RPS} | {_yes(chain.rps >= TARGET_RPS and not chain.non2xx and not chain.errors)} "
                f"| {cmd_tp} |")
    cpu_b = throughput.by_service(base.cpu_ms_per_request)
    cpu_c = throughput.by_service(chain.cpu_ms_per_request)
    top = max(cpu_c, key=cpu_c.get)
    rows.append(f"| CPU ms per call, all processes, same runs (most: {top} {cpu_c[top]:.2f} ms) | "
                f"{sum(cpu_b.values()):.2f} | {sum(cpu_c.values()):.2f} | "
                f"{sum(cpu_c.values()) / sum(cpu_b.values()):.1f}x | | | {cmd_tp} |")
    cores = os.cpu_count() or 1
    rows.append(f"| calls/s the machine's {cores} cores could carry at that CPU per call, nothing else running "
                f"({cores} x 1000 / CPU ms per call) | {cores * 1000 / sum(cpu_b.values()):.0f} | "
                f"{cores * 1000 / sum(cpu_c.values()):.0f} | {sum(cpu_b.values()) / sum(cpu_c.values()):.2f}x | "
                f">= {TARGET_RPS} | {_yes(cores * 1000 / sum(cpu_c.values()) >= TARGET_RPS)} | {cmd_tp} |")
    lb, lc = latency["baseline"], latency["chain"]
    for q in (50, 99):
        added = lc.pct(q) - lb.pct(q)
        target = f"<= {TARGET_ADDED_P50_MS:g} ms added" if q == 50 else ""
        met = _yes(added <= TARGET_ADDED_P50_MS and not lc.non2xx and not lc.errors) if q == 50 else ""
        rows.append(f"| p{q} latency, non-streamed chat, open loop at {args.rate:g} calls/s | {lb.pct(q):.2f} ms | "
                    f"{lc.pct(q):.2f} ms | {added:+.2f} ms | {target} | {met} | {cmd_ol} |")
    ob = sum(lb.cpu_ms_per_call.values())
    oc_by = throughput.by_service(lc.cpu_ms_per_call)
    if ob and oc_by:
        top = max(oc_by, key=oc_by.get)
        rows.append(f"| CPU ms per call, all processes, open loop at {args.rate:g} calls/s (most: {top} "
                    f"{oc_by[top]:.2f} ms) | {ob:.2f} | {sum(oc_by.values()):.2f} | "
                    f"{sum(oc_by.values()) / ob:.1f}x | | | {cmd_ol} |")
    sb, sc = streams["baseline"], streams["chain"]
    for q in (50, 99):
        rows.append(f"| p{q} time to first token, streamed, {args.token_delay_ms} ms/token, open loop at "
                    f"{args.stream_rate:g} streams/s | {sb.pct(q, 'first_ms'):.2f} ms | {sc.pct(q, 'first_ms'):.2f} ms "
                    f"| {sc.pct(q, 'first_ms') - sb.pct(q, 'first_ms'):+.2f} ms | | | {cmd_tt} |")
    for name in sampler.pids:
        if " " in name or not memory.is_service(name):
            continue
        before, peak, end = (sampler.before[name] / 1024, sampler.peak[name] / 1024, sampler.end.get(name, 0) / 1024)
        rows.append(f"| RSS of {name} under the wrk load, peak (end) (baseline: before the load) | {before:.1f} MB | "
                    f"{peak:.1f} MB ({end:.1f}) | {peak / before:.2f}x | < {memory.LIMIT_MB:.0f} MB | "
                    f"{_yes(peak < memory.LIMIT_MB)} | {cmd_mem} |")
    others = [n for n in sampler.pids if " " not in n and not memory.is_service(n) and n in sampler.before]
    if others:
        text = ", ".join(f"{n} {sampler.peak[n] / 1024:.0f}" for n in others)
        rows.append(f"| RSS peak of the other processes, MB: {text} | | | | | | {cmd_mem} |")
    if "chain, 2 replicas" in load:
        r1, r2 = load["chain"], load["chain, 2 replicas"]
        c1, c2 = sum(r1.cpu_ms_per_request.values()), sum(r2.cpu_ms_per_request.values())
        rows.append(f"| calls/s through the whole chain, 2 replicas of each service (baseline: 1 replica), wrk "
                    f"{args.connections} connections | {r1.rps:.0f} | {r2.rps:.0f} | {r2.rps / r1.rps:.2f}x | | | "
                    f"{cmd_sc} |")
        rows.append(f"| CPU ms per call, all processes, 2 replicas (baseline: 1 replica) | {c1:.2f} | {c2:.2f} | "
                    f"{c2 / c1:.2f}x | | | {cmd_sc} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    harness.need_wrk()
    started = time.monotonic()
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(harness.mesh(**stack.enter_context(harness.stores(args.postgres_url,
                                                                                   args.redis_url))))
        keys = harness.paid_keys(mesh, args.keys)
        targets = [throughput.LoadTarget("baseline", mesh, throughput.baseline_url(mesh), []),
                   throughput.LoadTarget("chain", mesh, throughput.chain_url(mesh), keys)]
        meshes = {"": mesh}
        with contextlib.ExitStack() as second:
            if not args.no_scaling:
                settings2 = second.enter_context(harness.stores(args.postgres_url, args.redis_url))
                mesh2 = second.enter_context(harness.mesh(replicas=2, **settings2))
                keys2 = harness.paid_keys(mesh2, args.keys)
                targets.append(throughput.LoadTarget("chain, 2 replicas", mesh2, throughput.chain_url(mesh2), keys2))
                meshes["r2"] = mesh2
            print(f"meshes up and keys made in {time.monotonic() - started:.0f} s; load runs ...", file=sys.stderr)
            throughput.warm_up(targets)
            sampler, other_load = memory.RssSampler(throughput.pids(meshes)), throughput.OtherLoad(meshes)
            with sampler, other_load:
                load = throughput.load_rounds(targets, seconds=args.seconds, connections=args.connections,
                                              rounds=args.rounds)
        print("open-loop runs ...", file=sys.stderr)
        with throughput.OtherLoad({"": mesh}) as other_open:
            latency = openloop.run(openloop.chat_targets(mesh, keys), rate=args.rate, seconds=args.openloop_seconds,
                                   rounds=args.rounds, pids=openloop.mesh_pids(mesh))
        print("streamed runs ...", file=sys.stderr)
        with throughput.OtherLoad({"": mesh}) as other_stream:
            streams = ttft.measure(mesh, keys, rate=args.stream_rate, seconds=args.openloop_seconds,
                                   rounds=args.rounds, token_delay_ms=args.token_delay_ms)
    load_after = os.getloadavg()
    print(f"## Benchmark suite on {harness.stores_named(args)} ({os.cpu_count()} cores; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{time.monotonic() - started:.0f} s in all)\n")
    print(f"Other work on the machine (not these meshes, not wrk or this client) kept {other_load.cores:.2f} of "
          f"{os.cpu_count()} cores busy during the wrk runs, {other_open.cores:.2f} during the open-loop runs and "
          f"{other_stream.cores:.2f} during the streamed runs; the hypervisor stole {other_load.steal_cores:.2f}, "
          f"{other_open.steal_cores:.2f} and {other_stream.steal_cores:.2f} of them"
          f"{harness.external_note(args)}.\n")
    print(f"Non-streamed chat is `{harness.CHAT_BODY['model']}`, max_tokens {harness.CHAT_BODY['max_tokens']}; "
          f"every row's baseline was measured in the same run, on 127.0.0.1.\n")
    print(summary(args, load, sampler, latency, streams))
    print("\n### Throughput (wrk, closed loop)\n")
    rows = [load[t.name] for t in targets]
    print(harness.table(rows, rows[0]))
    print()
    print(throughput.cpu_table(rows))
    if "chain, 2 replicas" in load:
        print("\n### One replica vs two\n")
        print(scaling.table(load["chain"], load["chain, 2 replicas"]))
    print(f"\n### Added latency, open loop at {args.rate:g} calls/s\n")
    print(openloop.table(latency))
    print()
    print(openloop.cpu_table(latency))
    print(f"\n### Streamed, {args.token_delay_ms} ms between tokens, open loop at {args.stream_rate:g} streams/s\n")
    print(ttft.table(streams))
    print()
    print(openloop.cpu_table(streams))
    print("\n### Memory (VmRSS), sampled every 50 ms during the wrk runs\n")
    print(memory.table(sampler))
    bad = [r.name for r in rows if r.errors or r.non2xx]
    bad += [f"open loop {o.name}" for o in (*latency.values(), *streams.values()) if o.errors or o.non2xx]
    if bad:
        print(f"\nWARNING: errors or non-2xx replies in {', '.join(bad)}: those rows do not measure what they claim.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
