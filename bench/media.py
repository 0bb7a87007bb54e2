"""Images and speech through the whole chain vs. Envoy straight to the reference backend.

    ./dev bench media [--seconds 10] [--connections 16]

Starts a mesh on free ports, makes enough Paid keys that the rate limit never refuses a
call, then drives each modality with wrk, both paths in the same run: the baseline
(wrk -> Envoy -> reference backend, no filters) and the gateway (wrk -> Envoy -> auth ->
ratelimit -> transcoder -> ledger (hold) -> router (validate, call, settle) -> backend).
Images are one 256x256 PNG as b64_json (the reference backend caches a repeated prompt,
so the backend's own cost is small and the chain's shows); speech is "hello world" as
WAV. Prints calls/s and latency per path, and the CPU each process spent per call.
"""
import argparse

from bench import harness

IMAGE_BODY = {"model": "ref-image", "prompt": "a lighthouse at dawn", "size": "256x256"}
SPEECH_BODY = {"model": "ref-tts", "input": "hello world", "voice": "alloy", "response_format": "wav"}
RUNS = (("images", "/v1/images/generations", IMAGE_BODY), ("speech", "/v1/audio/speech", SPEECH_BODY))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--keys", type=int, default=80)
    args = parser.parse_args(argv)
    with harness.mesh() as mesh:
        keys = harness.paid_keys(mesh, args.keys)
        gateway = mesh.config.base_url
        baseline = f"http://127.0.0.1:{mesh.config.baseline_port}"
        results = []
        for name, path, body in RUNS:
            harness.wrk(gateway + path, body, keys, connections=4, seconds=2)  # warm up
            harness.wrk(baseline + path, body, [], connections=4, seconds=1)
            pair = []
            for label, url, run_keys in ((f"{name}: baseline", baseline + path, []),
                                         (f"{name}: gateway", gateway + path, keys)):
                result = harness.measured(mesh, lambda: harness.wrk(url, body, run_keys,
                                                                    connections=args.connections,
                                                                    seconds=args.seconds))
                result.name = f"{label}, {args.connections} connections"
                pair.append(result)
            print(harness.table(pair, pair[0]))
            print()
            results.extend(pair)
        print(harness.cpu_table(results))


if __name__ == "__main__":
    main()
