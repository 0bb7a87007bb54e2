"""Prometheus metrics of router_svc; common.metrics serves the default registry over HTTP."""
import logging

import prometheus_client

log = logging.getLogger(__name__)

OVERRUNS = prometheus_client.Counter(
    "router_backend_overruns", "Calls a backend returned more for than was held (output or input tokens, "
    "choices, stream events, images, video seconds): cut at the hold, and charged at most the hold.",
    ["backend", "unit"])
CALLS_ENDED = prometheus_client.Counter(
    "router_calls_ended", "Streams router_svc ended itself: at the maximum call duration (TOKENS_CALL_MAX_S), "
    "or because their hold could not be renewed in time.", ["reason"])
UNARY_ABANDONED = prometheus_client.Counter(
    "router_unary_abandoned", "Non-streamed calls whose client left before the answer: the backend call ran "
    "to its end and was charged.")


def overran(backend_url: str, model_id: str, units: list[str], **details) -> None:
    """A backend returned more than was held: logged, and counted per backend and unit."""
    if not units:
        return
    log.warning("the backend returned more than was held; cut at the hold",
                extra={"backend": backend_url, "model": model_id, "units": units, **details})
    for unit in units:
        OVERRUNS.labels(backend=backend_url, unit=unit).inc()
