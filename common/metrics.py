"""Prometheus metrics every service shares, and serving them over HTTP.

Each service also defines its own (ratelimit decisions, holds, outbox depth...)
in the default registry; TOKENS_METRICS_PORT serves all of them at /metrics.
"""
import prometheus_client

GRPC_CALLS = prometheus_client.Counter(
    "tokens_grpc_calls", "gRPC calls handled, by method and status code.", ["method", "code"])
GRPC_SECONDS = prometheus_client.Histogram(
    "tokens_grpc_call_seconds", "Time to handle a gRPC call (to the last message for streams).", ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
DEPENDENCY_ERRORS = prometheus_client.Counter(
    "tokens_dependency_errors", "Failed calls to a dependency (database, redis, ledger, backend).", ["dependency"])


class MethodMetrics:
    """Children bound once per method, so a call costs one dict lookup."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.seconds = GRPC_SECONDS.labels(method=method)
        self._calls: dict[str, prometheus_client.Counter] = {}

    def done(self, code: str, seconds: float) -> None:
        counter = self._calls.get(code)
        if counter is None:
            counter = self._calls[code] = GRPC_CALLS.labels(method=self.method, code=code)
        counter.inc()
        self.seconds.observe(seconds)


def serve(host: str, port: int) -> None:
    """Serves /metrics on a thread of its own; port 0 means no metrics endpoint."""
    if port:
        prometheus_client.start_http_server(port, addr=host)
