"""Prometheus metrics of ledger_svc; common.metrics serves the default registry over HTTP."""
import prometheus_client

from common import metrics as common_metrics

CHECKS = prometheus_client.Counter(
    "ledger_checks", "ext_authz Check answers by result.", ["result"])
SETTLEMENTS = prometheus_client.Counter(
    "ledger_settlements", "Settlements by status.", ["status"])
BATCH_OPERATIONS = prometheus_client.Histogram(
    "ledger_batch_operations", "Holds, settlements and expiries applied per transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000))
BATCH_SECONDS = prometheus_client.Histogram(
    "ledger_batch_seconds", "Time to apply one batch, from BEGIN to COMMIT.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
SETTLEMENTS_CAPPED = prometheus_client.Counter(
    "ledger_settlements_capped", "Settlements whose units cost more than their hold: charged at most the hold.")
HOLDS_CLAIMED = prometheus_client.Counter(
    "ledger_holds_claimed", "Holds router_svc claimed: calls still running after TOKENS_HOLD_CLAIM_AFTER_S.")
HOLDS_EXPIRED = prometheus_client.Counter(
    "ledger_holds_expired", "Holds that lapsed unsettled: calls that never reached a router, or a router that died.")
OUTBOX_SENT = prometheus_client.Counter(
    "ledger_outbox_sent", "Emails sent and events exported.", ["outbox"])
OUTBOX_FAILED = prometheus_client.Counter(
    "ledger_outbox_failed", "Deliveries that failed (retried with backoff, or given up).", ["outbox"])

# Bound once, so the hot path does no label lookup.
ADMITTED = CHECKS.labels(result="admitted")
INSUFFICIENT = CHECKS.labels(result="insufficient_credit")
REFUSED = CHECKS.labels(result="refused")
FREE = CHECKS.labels(result="free")
DATABASE_ERRORS = common_metrics.DEPENDENCY_ERRORS.labels(dependency="database")

_SETTLED: dict[str, prometheus_client.Counter] = {}


def settled(status: str) -> prometheus_client.Counter:
    """SETTLEMENTS' child for a status, bound on first use (no label lookup per settlement
    after that, and no zero series for statuses never seen)."""
    child = _SETTLED.get(status)
    if child is None:
        child = _SETTLED[status] = SETTLEMENTS.labels(status=status)
    return child
