"""Resident memory (VmRSS) of every process of a mesh, sampled while load runs.

    ./dev bench memory [--seconds 4] [--rounds 2] [--connections 32] [--keys 80]

The same run as ./dev bench throughput (wrk at --connections against the
baseline listener and the whole chain, rounds alternating), printed as memory:
each process's RSS before the load (after a warm-up), its peak while wrk ran
(sampled every 50 ms from /proc/<pid>/status), and at the end of the load. The
baseline of each figure is the same process before the load. RSS counts shared
pages (the Python runtime, Envoy's binary) in every process that maps them.
"""
import contextlib
import pathlib
import threading

LIMIT_MB = 150.0
SERVICE_PREFIXES = ("auth_svc", "ratelimit_svc", "ledger_svc", "router_svc")


def rss_kb(pid: int) -> int | None:
    """VmRSS of a live process in kB, None once it is gone."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def snapshot(pids: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        value = rss_kb(pid)
        if value is not None:
            out[name] = value
    return out


class RssSampler:
    """Samples every process in `pids` on a thread until stopped; keeps each one's peak."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.05) -> None:
        self.pids = dict(pids)
        self.interval_s = interval_s
        self.before = snapshot(self.pids)
        self.peak = dict(self.before)
        self.end: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, value in snapshot(self.pids).items():
                if value > self.peak.get(name, 0):
                    self.peak[name] = value
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.end = snapshot(self.pids)
        for name, value in self.end.items():
            self.peak[name] = max(self.peak.get(name, 0), value)


def is_service(name: str) -> bool:
    return name.split(" ")[-1].startswith(SERVICE_PREFIXES)


def table(sampler: RssSampler, names: list[str] | None = None) -> str:
    names = names or list(sampler.pids)
    lines = ["| process | before load MB | peak under load MB | end of load MB | peak vs before | "
             f"under {LIMIT_MB:.0f} MB (services) |", "|---|---|---|---|---|---|"]
    for name in names:
        if name not in sampler.before:
            continue
        before, peak, end = (sampler.before[name] / 1024, sampler.peak.get(name, 0) / 1024,
                             sampler.end.get(name, 0) / 1024)
        verdict = ("yes" if peak < LIMIT_MB else "NO") if is_service(name) else "(not a service)"
        lines.append(f"| {name} | {before:.1f} | {peak:.1f} | {end:.1f} | {peak / before:.2f}x | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import throughput

    return throughput.main(argv, memory_only=True)


if __name__ == "__main__":
    import sys

    sys.exit(main())
