"""Non-streamed chat calls/s at 32 connections: the whole chain vs. Envoy straight to the backend.

    ./dev bench throughput [--seconds 4] [--rounds 2] [--connections 32] [--keys 80]

Starts a mesh on free ports (one replica of each service, embedded SQLite and
Redis, a baseline listener), makes enough Paid keys that the rate limit never
refuses a call, warms both paths up, then drives them with wrk (closed loop,
--connections connections, one wrk thread) in --rounds that alternate which goes
first, so that load from elsewhere on the machine falls on both alike:
  baseline  wrk -> Envoy -> reference backend (no filters);
  chain     wrk -> Envoy -> auth -> ratelimit -> transcoder -> ledger (hold) ->
            router -> reference backend, then the router settles with the ledger.
It prints calls/s (and the ratio to the baseline), wrk's p50/p99, the CPU ms
each process spent per call, and the RSS of every process (see bench/memory.py),
sampled all along.
"""
import argparse
import dataclasses
import os
import sys
import time

from bench import harness, memory

SECONDS_MAX = 30.0


@dataclasses.dataclass
class LoadTarget:
    name: str
    mesh: object
    url: str
    keys: list[str]


def chain_url(mesh) -> str:
    return f"{mesh.config.base_url}/v1/chat/completions"


def baseline_url(mesh) -> str:
    return f"http://127.0.0.1:{mesh.config.baseline_port}/v1/chat/completions"


def pids(meshes: dict[str, object]) -> dict[str, int]:
    """'label process' -> pid of every live process of the meshes (no label prefix for ''), wrk excluded."""
    out = {}
    for label, mesh in meshes.items():
        for name, proc in mesh.procs.items():
            if proc.poll() is None:
                out[f"{label} {name}".strip()] = proc.pid
    return out


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds since boot, every core of the machine (/proc/stat): busy (all but idle and
    iowait, steal included), and steal (what the hypervisor gave this VM's runnable vCPUs to others)."""
    with open("/proc/stat") as stat:
        fields = ([int(v) for v in stat.readline().split()[1:]] + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / tick, fields[7] / tick


class OtherLoad:
    """How many cores other work on the machine kept busy meanwhile: the machine's busy CPU
    minus that of the meshes' processes, of this process and of its finished children (wrk).
    `steal_cores` is the part of it the hypervisor gave to other VMs (the host's neighbours)."""

    def __init__(self, meshes: dict[str, object]) -> None:
        self.pids = pids(meshes)
        self.cores = 0.0
        self.steal_cores = 0.0

    def _now(self) -> tuple[float, float, float, float, float]:
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        busy, steal = machine_cpu_s()
        return time.monotonic(), busy, sum(harness.cpu_seconds(self.pids).values()), ours, steal

    def __enter__(self) -> "OtherLoad":
        self._start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        end = self._now()
        elapsed, busy, meshes, ours, steal = (b - a for a, b in zip(self._start, end))
        self.cores = max(0.0, busy - meshes - ours) / elapsed if elapsed > 0 else 0.0
        self.steal_cores = max(0.0, steal) / elapsed if elapsed > 0 else 0.0

    def line(self, note: str = "") -> str:
        return (f"Other work on the machine (not this mesh, not this client) kept {self.cores:.2f} of "
                f"{os.cpu_count()} cores busy meanwhile, {self.steal_cores:.2f} of them stolen by the hypervisor"
                f"{note}: a run with either well above 0 measured the neighbours too.")


def warm_up(targets: list[LoadTarget], seconds: float = 2.0) -> None:
    for t in targets:
        harness.wrk(t.url, harness.CHAT_BODY, t.keys, connections=8, seconds=seconds)


def load_rounds(targets: list[LoadTarget], *, seconds: float, connections: int,
                rounds: int) -> dict[str, harness.Result]:
    """Every target driven by wrk for `seconds` per round; each round rotates who goes first."""
    runs: dict[str, list[harness.Result]] = {t.name: [] for t in targets}
    for round_no in range(rounds):
        shift = round_no % len(targets)
        for t in targets[shift:] + targets[:shift]:
            result = harness.measured(t.mesh, lambda: harness.wrk(t.url, harness.CHAT_BODY, t.keys,
                                                                  connections=connections, seconds=seconds))
            runs[t.name].append(result)
    return {name: harness.combine(name, results) for name, results in runs.items()}


def by_service(cpu: dict[str, float]) -> dict[str, float]:
    """CPU per call with the replicas of a service summed: auth_svc#0 + auth_svc#1 -> auth_svc."""
    out: dict[str, float] = {}
    for name, value in cpu.items():
        key = name.split("#")[0]
        out[key] = round(out.get(key, 0.0) + value, 3)
    return out


def cpu_table(results: list[harness.Result]) -> str:
    grouped = [by_service(r.cpu_ms_per_request) for r in results]
    names = sorted({n for g in grouped for n in g}, key=lambda n: (not n.endswith("_svc"), n))
    lines = ["| run | " + " | ".join(names) + " | all processes |", "|---|" + "---|" * (len(names) + 1)]
    for r, g in zip(results, grouped):
        lines.append(f"| {r.name} | " + " | ".join(f"{g.get(n, 0):.3f}" for n in names)
                     + f" | {sum(g.values()):.3f} |")
    return "CPU ms per call, by process (replicas summed):\n\n" + "\n".join(lines)


def parse(argv: list[str], prog: str, doc: str, rate: bool = False, stores: bool = True) -> argparse.Namespace:
    """The load arguments; with `rate`, also --rate for an open-loop part (calls/s, default 50); with
    `stores`, --postgres-url and --redis-url."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if rate:
        parser.add_argument("--rate", type=float, default=50.0, help="calls/s of the open-loop part (default 50)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per wrk run (default 4)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds alternating the order (default 2)")
    parser.add_argument("--keys", type=int, default=80, help="Paid keys per mesh (default 80)")
    if stores:
        harness.add_store_args(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= SECONDS_MAX:
        parser.error(f"--seconds must be in [1, {SECONDS_MAX:g}]")
    if not 1 <= args.connections <= 256 or not 1 <= args.rounds <= 10 or not 1 <= args.keys <= 2000:
        parser.error("--connections must be 1..256, --rounds 1..10, --keys 1..2000")
    if rate and not 0 < args.rate <= 200:
        parser.error("--rate must be in (0, 200]")
    return args


def main(argv: list[str] | None = None, memory_only: bool = False) -> int:
    prog = "./dev bench memory" if memory_only else "./dev bench throughput"
    args = parse(sys.argv[1:] if argv is None else argv, prog, memory.__doc__ if memory_only else __doc__)
    harness.need_wrk()
    with harness.stores(args.postgres_url, args.redis_url) as settings, harness.mesh(**settings) as mesh:
        keys = harness.paid_keys(mesh, args.keys)
        targets = [LoadTarget("baseline", mesh, baseline_url(mesh), []),
                   LoadTarget("chain", mesh, chain_url(mesh), keys)]
        warm_up(targets)
        with memory.RssSampler(pids({"": mesh})) as sampler:
            results = load_rounds(targets, seconds=args.seconds, connections=args.connections, rounds=args.rounds)
    print(f"non-streamed chat (max_tokens {harness.CHAT_BODY['max_tokens']}) on {harness.stores_named(args)}, "
          f"wrk at {args.connections} connections, "
          f"{args.rounds} round(s) of {args.seconds:g} s per row\n")
    if not memory_only:
        rows = [results["baseline"], results["chain"]]
        print(harness.table(rows, rows[0]))
        print()
        print(cpu_table(rows))
        print()
    print(memory.table(sampler))
    return 0


if __name__ == "__main__":
    sys.exit(main())
