"""Streamed time to first token through the whole chain vs. the baseline listener.

    ./dev bench ttft [--rate 25] [--seconds 5] [--rounds 2] [--keys 40] [--token-delay-ms 20]

Starts a mesh on free ports and sends streamed chat calls (stream=true, 16
tokens, the reference backend pausing --token-delay-ms between two tokens, as a
model would) open-loop at --rate (see bench/openloop.py: each call is due at a
fixed time, and latency counts from that time), to the baseline (Envoy straight
to the reference backend) and to the whole chain, in --rounds that alternate
between them every second. Time to first token is due time -> the first SSE
event that carries text; the whole stream (due time -> last byte) is printed
too, so a chain that buffered the stream instead of relaying it would show up
as a first token close to the whole stream.

The delay is set per request with the backend's `[[delay_ms=N]]` directive, the
same pause TOKENS_BACKEND_TOKEN_DELAY_MS sets for every request: so the
non-streamed benchmarks can share the mesh at full speed.
"""
import sys
import time

from bench import harness, openloop, throughput

TOKEN_DELAY_MAX_MS = 1000


def stream_body(token_delay_ms: int) -> dict:
    body = dict(harness.CHAT_BODY, stream=True)
    body["messages"] = [{"role": "user", "content": f"Say something short. [[delay_ms={token_delay_ms}]]"}]
    return body


def measure(mesh, keys: list[str], *, rate: float, seconds: float, rounds: int,
            token_delay_ms: int) -> dict[str, openloop.Outcome]:
    targets = openloop.chat_targets(mesh, keys, stream_body(token_delay_ms), stream=True)
    return openloop.run(targets, rate=rate, seconds=seconds, rounds=rounds, pids=openloop.mesh_pids(mesh))


def table(outcomes: dict[str, openloop.Outcome]) -> str:
    base = outcomes["baseline"]
    lines = ["| run | streams | TTFT p50 ms | TTFT p99 ms | added p50 ms | added p99 ms | whole stream p50 ms "
             "| whole stream p99 ms | errors | non-2xx |", "|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes.values():
        lines.append(f"| {o.name} | {len(o.samples)} | {o.pct(50, 'first_ms'):.2f} | {o.pct(99, 'first_ms'):.2f} | "
                     f"{o.pct(50, 'first_ms') - base.pct(50, 'first_ms'):+.2f} | "
                     f"{o.pct(99, 'first_ms') - base.pct(99, 'first_ms'):+.2f} | {o.pct(50):.1f} | "
                     f"{o.pct(99):.1f} | {o.errors} | {o.non2xx} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = openloop.make_parser("./dev bench ttft", __doc__, 25.0, 5.0)
    parser.add_argument("--token-delay-ms", type=int, default=20, help="pause between two tokens (default 20)")
    args = openloop.check(parser, parser.parse_args(sys.argv[1:] if argv is None else argv))
    if not 0 <= args.token_delay_ms <= TOKEN_DELAY_MAX_MS:
        parser.error(f"--token-delay-ms must be 0..{TOKEN_DELAY_MAX_MS}")
    delay = args.token_delay_ms
    with harness.stores(args.postgres_url, args.redis_url) as settings, harness.mesh(**settings) as mesh:
        keys = harness.paid_keys(mesh, args.keys)
        started = time.monotonic()
        with throughput.OtherLoad({"": mesh}) as other:
            outcomes = measure(mesh, keys, rate=args.rate, seconds=args.seconds, rounds=args.rounds,
                               token_delay_ms=delay)
    print(f"streamed chat (16 tokens, {delay} ms between tokens), open loop at {args.rate:g} streams/s, "
          f"{args.rounds} round(s) of {args.seconds:g} s per row ({time.monotonic() - started:.0f} s)\n")
    print(table(outcomes))
    print()
    print(openloop.cpu_table(outcomes))
    print()
    print(other.line(harness.external_note(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
