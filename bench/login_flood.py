"""The inference path during a flood of wrong logins, against the same path idle, in one run.

    ./dev bench login_flood [--rate 20] [--logins 30] [--seconds 5] [--rounds 3]

Starts a mesh on free ports (every limit at its default) and calls GET /v1/models with Paid
keys open-loop at --rate calls a second, in slices of --seconds that rotate: idle; with
--logins wrong logins a second arriving at POST /v1/sessions; and with as many refused
before argon2 (all for one email, past its limit: what the requests alone cost). Load from
elsewhere on the machine falls on all three alike. Each wrong login is for
an email of its own and comes from a loopback address of its own every 25 logins, as a
botnet's would: the limits per email and per address (which stop one attacker after a few
tries) do not stop it, so every login costs auth_svc an argon2 hash (64 MiB, tens of ms
of one core) unless its bounded pool is full (503 at once). It prints the /v1/models
latency of both, what the logins were answered, and the CPU auth_svc spent.

Open loop, like bench/openloop.py: each call starts at its due time whatever happened to
the earlier ones, and its latency counts from that due time. The flood is sent by a process
of its own, so that its work never delays the measured calls' client.
"""
import argparse
import asyncio
import collections
import contextlib
import json
import math
import pathlib
import subprocess
import sys
import time
import uuid

from bench import harness, openloop, throughput

RATE_MAX = 200.0
LOGINS_MAX = 200.0
SECONDS_MAX = 30.0
TIMEOUT_S = 10.0
LOGINS_PER_ADDRESS = 25  # under the 30 failed logins an address may make in 15 minutes
PASSWORD = "not the password of anyone"


def _addresses():
    """Loopback addresses for the flood's clients, away from 127.0.0.1 (the benchmark's own)."""
    n = 3 << 16
    while True:
        yield f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        n += 1


async def _get(session, url: str, key: str, due: float, loop) -> openloop.Sample:
    import aiohttp

    lag_ms = (loop.time() - due) * 1000
    try:
        async with session.get(url, headers={"Authorization": f"Bearer {key}"}) as reply:
            await reply.read()
            status = reply.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        status = 0
    latency_ms = (loop.time() - due) * 1000
    return openloop.Sample(lag_ms, latency_ms, latency_ms, status)


async def _models(session, url: str, keys: list[str], rate: float, seconds: float, offset: int) -> list:
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.01
    tasks = []
    for i in range(max(1, round(rate * seconds))):
        due = start + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(asyncio.create_task(_get(session, url, keys[(offset + i) % len(keys)], due, loop)))
    return list(await asyncio.gather(*tasks))


async def _login(session, url: str, email: str) -> int:
    import aiohttp

    try:
        async with session.post(url, json={"email": email or f"flood-{uuid.uuid4().hex[:12]}@example.com",
                                           "password": PASSWORD}) as reply:
            await reply.read()
            return reply.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return 0


async def _flood(url: str, logins: float, seconds: float, addresses, answers: collections.Counter,
                 email: str = "") -> None:
    """The flood itself, in the process `--flood` starts: each login for an email of its own, or
    all for `email`."""
    import aiohttp

    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    start = loop.time()
    sessions, tasks = [], []
    try:
        for i in range(max(1, round(logins * seconds))):
            if i % LOGINS_PER_ADDRESS == 0:
                connector = aiohttp.TCPConnector(limit=0, local_addr=(next(addresses), 0))
                sessions.append(aiohttp.ClientSession(connector=connector, timeout=timeout))
            due = start + i / logins
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            tasks.append(asyncio.create_task(_login(sessions[-1], url, email)))
        for status in await asyncio.gather(*tasks):
            answers[status] += 1
    finally:
        for session in sessions:
            await session.close()


def flood_main(url: str, logins: float, seconds: float, first_address: int, email: str) -> None:
    """`--flood URL LOGINS SECONDS N EMAIL`: sends the flood, prints the answers' counts as JSON."""
    answers: collections.Counter = collections.Counter()
    addresses = _addresses()
    for _ in range(first_address):
        next(addresses)
    import aiohttp  # noqa: F401  (loaded before saying ready, so that the flood starts on time)
    print("ready", flush=True)
    asyncio.run(_flood(url, logins, seconds, addresses, answers, email))
    print(json.dumps({str(code): count for code, count in answers.items()}))


async def _start_flood(url: str, logins: float, seconds: float, first_address: int, email: str):
    """The flood's process, once it is about to send its first login."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.login_flood", "--flood", url, str(logins), str(seconds), str(first_address),
        email, stdout=subprocess.PIPE)
    assert (await asyncio.wait_for(process.stdout.readline(), 30)).strip() == b"ready"
    return process


async def _flood_answers(process, seconds: float) -> collections.Counter:
    out, _ = await asyncio.wait_for(process.communicate(), seconds + TIMEOUT_S + 30)
    return collections.Counter({int(code): count for code, count in json.loads(out.decode().strip()).items()})


def argon2_workers(mesh) -> dict[str, int]:
    """auth_svc's password workers (its child processes, spawned by its first hash), by name."""
    out = {}
    for name, proc in mesh.procs.items():
        if name.startswith("auth_svc") and proc.poll() is None:
            with contextlib.suppress(OSError):
                children = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                out.update({f"{name} argon2 {n}": int(pid) for n, pid in enumerate(children)})
    return out


async def _run(mesh, keys: list[str], args, pids: dict[str, int]) -> tuple[dict, dict, dict]:
    import aiohttp

    base = mesh.config.base_url
    # "refused flood": the same wrong logins, all for one email, so that past its first ten
    # (the limit per email) none is hashed: what the requests cost without argon2.
    kinds = ("idle", "login flood", "refused flood")
    outcomes = {name: openloop.Outcome(name, args.rate, 0.0) for name in kinds}
    victim = f"victim-{uuid.uuid4().hex[:8]}@example.com"
    answers_of = {name: collections.Counter() for name in kinds}
    # name -> (auth_svc's CPU seconds, its password workers' included, and wall seconds) over
    # the slices of that name, the flood's until its last login was answered.
    auth_cpu = {name: [0.0, 0.0] for name in outcomes}
    addresses_used = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
        await _models(session, f"{base}/v1/models", keys, args.rate, 1.0, 0)  # warm up, unmeasured
        sent = 0
        for turn in range(3 * args.rounds):
            name = kinds[turn % 3]
            flood = None if name == "idle" else await _start_flood(
                f"{base}/v1/sessions", args.logins, args.seconds, addresses_used,
                victim if name == "refused flood" else "")
            before, began = harness.cpu_seconds(pids), time.monotonic()
            samples = await _models(session, f"{base}/v1/models", keys, args.rate, args.seconds, sent)
            if flood is not None:
                answers_of[name].update(await _flood_answers(flood, args.seconds))
                addresses_used += math.ceil(args.logins * args.seconds / LOGINS_PER_ADDRESS)
            after = harness.cpu_seconds(pids)
            auth_cpu[name][0] += sum(after[p] - before[p] for p in after if p.startswith("auth_svc") and p in before)
            auth_cpu[name][1] += time.monotonic() - began
            outcomes[name].samples += samples
            outcomes[name].seconds += args.seconds
            sent += len(samples)
            await asyncio.sleep(0.5)
    return outcomes, answers_of, auth_cpu


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--flood"]:
        flood_main(argv[1], min(float(argv[2]), LOGINS_MAX), min(float(argv[3]), SECONDS_MAX), int(argv[4]), argv[5])
        return 0
    parser = argparse.ArgumentParser(prog="./dev bench login_flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20.0, help="/v1/models calls a second (default 20)")
    parser.add_argument("--logins", type=float, default=30.0, help="wrong logins a second in the flood (default 30)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per slice (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three slices (default 3)")
    args = parser.parse_args(argv)
    if not (0 < args.rate <= RATE_MAX and 0 < args.logins <= LOGINS_MAX and 0 < args.seconds <= SECONDS_MAX
            and 1 <= args.rounds <= 10):
        parser.error(f"--rate (0, {RATE_MAX:g}], --logins (0, {LOGINS_MAX:g}], --seconds (0, {SECONDS_MAX:g}], "
                     "--rounds 1..10")
    started = time.monotonic()
    with harness.mesh() as mesh:
        # Paid keys: 300 calls a minute each, so that no call of the run is a 429.
        keys = harness.paid_keys(mesh, max(2, math.ceil(args.rate * 60 / 250)))  # its signups start the workers
        workers = argon2_workers(mesh)
        other = throughput.OtherLoad({"": mesh})
        other.pids.update(workers)
        with other:
            outcomes, answers, auth_cpu = asyncio.run(_run(mesh, keys, args, {**openloop.mesh_pids(mesh), **workers}))
    print(f"GET /v1/models open loop at {args.rate:g} calls/s, {args.rounds} x {args.seconds:g} s each idle, during "
          f"{args.logins:g} wrong logins/s that reach argon2, and during as many refused before it (one email, "
          f"past its limit), in rotation ({time.monotonic() - started:.0f} s)\n")
    base = outcomes["idle"]
    print("| run | calls | p50 ms | p99 ms | p99.9 ms | p50 vs idle | p99 vs idle | errors | non-2xx |")
    print("|---|---|---|---|---|---|---|---|---|")
    for o in outcomes.values():
        print(f"| {o.name} | {len(o.samples)} | {o.pct(50):.2f} | {o.pct(99):.2f} | {o.pct(99.9):.2f} | "
              f"{o.pct(50) - base.pct(50):+.2f} | {o.pct(99) - base.pct(99):+.2f} | {o.errors} | {o.non2xx} |")
    named = {401: "401 wrong password (hashed)", 429: "429 limited", 503: "503 pool full", 0: "no answer"}
    cores = {name: spent / wall if wall else 0.0 for name, (spent, wall) in auth_cpu.items()}
    print()
    for name, answers in answers.items():
        sent = f"{sum(answers.values())} wrong logins: " + ", ".join(
            f"{named.get(code, code)} {count}" for code, count in sorted(answers.items())) + "; " if answers else ""
        print(f"{name}: {sent}auth_svc {cores[name]:.2f} cores (its password workers included, until the last "
              "login was answered)")
    print(other.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
