"""Running a service's main process: gRPC's I/O settings, then the main coroutine on
uvloop, whose event loop costs measurably less CPU per call than asyncio's (a trivial
grpc.aio call: ~380 us of server CPU instead of ~460 us on this project's 2-core machine).

Every service's __main__ imports this module first, because gRPC reads
GRPC_EXPERIMENTS once, when its C core loads (setting it after `import grpc` has no
effect). By default gRPC 1.85 does a server's socket I/O on its EventEngine threads,
which hand each event to the completion-queue thread that grpc.aio polls, which hands
it to the event loop: three threads per event. With the EventEngine listener, client
and endpoints turned off, the completion-queue thread reads the socket itself, and a
call costs about 24 fewer context switches across the four services (94 -> 70, counted
per thread in /proc at 50 calls/s) and ~0.6 ms less added latency at 50 calls/s
(`./dev bench openloop`, four paired runs: +4.90 -> +4.26 ms p50); throughput at c=32 is
unchanged. An operator's own GRPC_EXPERIMENTS (even an empty one) wins.
"""
import os
import sys
from collections.abc import Coroutine

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"

if "grpc" in sys.modules:  # pragma: no cover - a wrong import order, caught in development
    raise ImportError("common.runtime must be imported before grpc: gRPC reads GRPC_EXPERIMENTS when it loads")
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)

import uvloop  # noqa: E402 - after the environment is set


def run(main: Coroutine) -> None:
    uvloop.run(main)
