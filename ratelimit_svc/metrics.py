"""Prometheus metrics of ratelimit_svc; shared code exposes the default registry over HTTP."""
import prometheus_client

DECISIONS = prometheus_client.Counter(
    "ratelimit_decisions", "Check answers by result.", ["result"])
REDIS_ERRORS = prometheus_client.Counter(
    "ratelimit_redis_errors", "Redis calls (decisions and probes) that failed or timed out.")
DEGRADED = prometheus_client.Gauge(
    "ratelimit_degraded", "1 while Redis is unreachable and windows are kept per replica in memory.")

# Bound once, so the hot path does no label lookup.
ALLOWED = DECISIONS.labels(result="allowed")
LIMITED = DECISIONS.labels(result="limited")
UNAUTHENTICATED = DECISIONS.labels(result="unauthenticated")
