"""Added latency at a fixed call rate, measured open-loop (no coordinated omission).

    ./dev bench openloop [--rate 50] [--seconds 5] [--rounds 2] [--keys 40]

Starts a mesh on free ports (one replica of each service, embedded SQLite and
Redis, a baseline listener) and sends non-streamed chat calls at a fixed rate,
first to the baseline (Envoy straight to the reference backend), then to the
whole chain (auth, rate limit, transcoder, ledger hold, router, settlement), in
--rounds that alternate between them every second (ABBA...), so that load from
elsewhere on the machine falls on both alike. It prints p50/p99/p99.9 of each and
what the chain adds, and how late the generator started calls (send lag).

Why open-loop: a closed-loop client (wrk, or N workers that each wait for a reply
before sending again) sends less when the server slows down, so the slow moments
are sampled less and the percentiles look better than what users see: coordinated
omission. Here call i is due at t0 + i/rate whatever happened to earlier calls:
the generator sleeps until each due time and starts the call as its own task
(new connections open as needed; the pool has no limit), so a slow reply never
delays the next send. Each latency is measured from the call's due time, not from
when it was actually sent, so if the generator itself falls behind, that delay
counts against the result too (and the report shows how late sends were).
"""
import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import sys
import time

from bench import harness, throughput

# Bounds, whatever the arguments.
RATE_MAX = 500.0
SECONDS_MAX = 30.0
TIMEOUT_S = 10.0


@dataclasses.dataclass(slots=True)
class Sample:
    lag_ms: float      # how late the generator started the call after its due time
    latency_ms: float  # due time -> whole reply read (streams: last byte)
    first_ms: float    # due time -> first token (streams); the same as latency_ms otherwise
    status: int        # HTTP status; 0 for a transport error or a timeout


@dataclasses.dataclass
class Target:
    name: str
    url: str
    body: dict
    keys: list[str] = dataclasses.field(default_factory=list)
    stream: bool = False


@dataclasses.dataclass
class Outcome:
    name: str
    rate: float
    seconds: float
    samples: list[Sample] = dataclasses.field(default_factory=list)
    # process -> CPU seconds it spent while this target was driven (when pids were given)
    cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def cpu_ms_per_call(self) -> dict[str, float]:
        return {name: round(spent * 1000 / len(self.samples), 3) for name, spent in self.cpu_s.items()
                if self.samples}

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if 200 <= s.status < 300]

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if s.status == 0)

    @property
    def non2xx(self) -> int:
        return sum(1 for s in self.samples if s.status and not 200 <= s.status < 300)

    def pct(self, q: float, field: str = "latency_ms") -> float:
        """Nearest-rank percentile over every sample; a failed call counts as the timeout."""
        values = sorted(getattr(s, field) if 200 <= s.status < 300 else TIMEOUT_S * 1000 for s in self.samples)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]

    @property
    def max_lag_ms(self) -> float:
        return max((s.lag_ms for s in self.samples), default=0.0)

    @property
    def p99_lag_ms(self) -> float:
        lags = sorted(s.lag_ms for s in self.samples)
        return lags[min(len(lags) - 1, math.ceil(0.99 * len(lags)) - 1)] if lags else 0.0


def _first_token(line: bytes) -> bool:
    """Whether an SSE line carries generated text (not the role-only or final chunk)."""
    if not line.startswith(b"data: {"):
        return False
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        choice = json.loads(line[6:])["choices"][0]
        return bool(choice.get("delta", {}).get("content") or choice.get("text"))
    return False


async def _call(session, target: Target, body: bytes, key: str | None, due: float, loop) -> Sample:
    import aiohttp

    lag_ms = (loop.time() - due) * 1000
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    first = None
    try:
        async with session.post(target.url, data=body, headers=headers) as reply:
            if target.stream and reply.status == 200:
                async for line in reply.content:
                    if first is None and _first_token(line):
                        first = loop.time()
            else:
                await reply.read()
            done = loop.time()
            status = reply.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        done, status = loop.time(), 0
    latency_ms = (done - due) * 1000
    return Sample(lag_ms, latency_ms, (first - due) * 1000 if first is not None else latency_ms, status)


async def drive(session, target: Target, rate: float, seconds: float, offset: int = 0) -> list[Sample]:
    """Calls due every 1/rate s for `seconds`, each started on time in its own task."""
    loop = asyncio.get_running_loop()
    body = json.dumps(target.body).encode()
    period = 1.0 / rate
    count = max(1, round(rate * seconds))
    start = loop.time() + 0.01
    tasks = []
    for i in range(count):
        due = start + i * period
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        key = target.keys[(offset + i) % len(target.keys)] if target.keys else None
        tasks.append(asyncio.create_task(_call(session, target, body, key, due, loop)))
    return list(await asyncio.gather(*tasks))


async def _run_async(targets: list[Target], rate: float, seconds: float, rounds: int,
                     warmup_s: float, slice_s: float, pids: dict[str, int]) -> dict[str, Outcome]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    sessions = {t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
                for t in targets}
    outcomes = {t.name: Outcome(t.name, rate, 0.0) for t in targets}
    slices = max(1, math.ceil(seconds / slice_s))
    try:
        for t in targets:  # open the connections; unmeasured
            await drive(sessions[t.name], t, rate, warmup_s)
        sent = 0
        for turn in range(rounds * slices):
            order = targets if turn % 2 == 0 else list(reversed(targets))
            for t in order:
                outcome = outcomes[t.name]
                before = harness.cpu_seconds(pids)
                outcome.samples += await drive(sessions[t.name], t, rate, seconds / slices, offset=sent)
                for name, spent in harness.cpu_seconds(pids).items():
                    if name in before:
                        outcome.cpu_s[name] = outcome.cpu_s.get(name, 0.0) + spent - before[name]
                outcome.seconds += seconds / slices
                sent += round(rate * seconds / slices)
    finally:
        for session in sessions.values():
            await session.close()
    return outcomes


def run(targets: list[Target], *, rate: float, seconds: float, rounds: int = 2,
        warmup_s: float = 1.0, slice_s: float = 1.0, pids: dict[str, int] | None = None) -> dict[str, Outcome]:
    """Each target driven open-loop at `rate` for `seconds` per round. A round is cut into slices
    of about `slice_s` that alternate between the targets (ABBA...), so that load from elsewhere
    on the machine, which comes and goes over seconds, falls on every target alike. With `pids`
    (name -> pid), each outcome also gets the CPU those processes spent while it was driven."""
    if not 0 < rate <= RATE_MAX or not 0 < seconds <= SECONDS_MAX:
        raise ValueError(f"rate must be in (0, {RATE_MAX:g}] and seconds in (0, {SECONDS_MAX:g}]")
    return asyncio.run(_run_async(targets, rate, seconds, rounds, warmup_s, slice_s, pids or {}))


def chat_targets(mesh, keys: list[str], body: dict | None = None, stream: bool = False) -> list[Target]:
    """The baseline listener and the whole chain of one mesh, the same body to both."""
    body = body or harness.CHAT_BODY
    return [Target("baseline", f"http://127.0.0.1:{mesh.config.baseline_port}/v1/chat/completions", body,
                   stream=stream),
            Target("chain", f"{mesh.config.base_url}/v1/chat/completions", body, keys, stream=stream)]


def cpu_table(outcomes: dict[str, Outcome]) -> str:
    grouped = {name: _by_service(o.cpu_ms_per_call) for name, o in outcomes.items()}
    names = sorted({n for g in grouped.values() for n in g}, key=lambda n: (not n.endswith("_svc"), n))
    lines = ["| run | " + " | ".join(names) + " | all processes |", "|---|" + "---|" * (len(names) + 1)]
    for name, g in grouped.items():
        lines.append(f"| {name} | " + " | ".join(f"{g.get(n, 0):.3f}" for n in names) + f" | {sum(g.values()):.3f} |")
    return "CPU ms per call, by process (replicas summed):\n\n" + "\n".join(lines)


def _by_service(cpu: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in cpu.items():
        key = name.split("#")[0]
        out[key] = round(out.get(key, 0.0) + value, 3)
    return out


def mesh_pids(mesh) -> dict[str, int]:
    return {name: proc.pid for name, proc in mesh.procs.items() if proc.poll() is None}


def table(outcomes: dict[str, Outcome], field: str = "latency_ms", label: str = "latency") -> str:
    base = outcomes["baseline"]
    lines = [f"| run | calls | calls/s due | {label} p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms "
             f"| errors | non-2xx | send lag p99 / max ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes.values():
        lines.append(f"| {o.name} | {len(o.samples)} | {o.rate:g} | {o.pct(50, field):.2f} | {o.pct(99, field):.2f} | "
                     f"{o.pct(99.9, field):.2f} | {o.pct(50, field) - base.pct(50, field):+.2f} | "
                     f"{o.pct(99, field) - base.pct(99, field):+.2f} | {o.errors} | {o.non2xx} | "
                     f"{o.p99_lag_ms:.2f} / {o.max_lag_ms:.2f} |")
    return "\n".join(lines)


def make_parser(prog: str, doc: str, rate: float, seconds: float) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=rate, help=f"calls started per second (default {rate:g})")
    parser.add_argument("--seconds", type=float, default=seconds, help=f"seconds per run (default {seconds:g})")
    parser.add_argument("--rounds", type=int, default=2, help="alternations baseline/chain (default 2)")
    parser.add_argument("--keys", type=int, default=40, help="Paid keys (default 40)")
    harness.add_store_args(parser)
    return parser


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if not 0 < args.rate <= RATE_MAX or not 0 < args.seconds <= SECONDS_MAX:
        parser.error(f"--rate must be in (0, {RATE_MAX:g}] and --seconds in (0, {SECONDS_MAX:g}]")
    if not 1 <= args.rounds <= 10 or not 1 <= args.keys <= 400:
        parser.error("--rounds must be 1..10, --keys 1..400")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("./dev bench openloop", __doc__, 50.0, 5.0)
    args = check(parser, parser.parse_args(sys.argv[1:] if argv is None else argv))
    with harness.stores(args.postgres_url, args.redis_url) as settings, harness.mesh(**settings) as mesh:
        keys = harness.paid_keys(mesh, args.keys)
        started = time.monotonic()
        with throughput.OtherLoad({"": mesh}) as other:
            outcomes = run(chat_targets(mesh, keys), rate=args.rate, seconds=args.seconds, rounds=args.rounds,
                           pids=mesh_pids(mesh))
    print(f"non-streamed chat on {harness.stores_named(args)}, open loop at {args.rate:g} calls/s, "
          f"{args.rounds} round(s) of {args.seconds:g} s per row ({time.monotonic() - started:.0f} s)\n")
    print(table(outcomes))
    print()
    print(cpu_table(outcomes))
    print()
    print(other.line(harness.external_note(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
