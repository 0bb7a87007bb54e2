"""ratelimit_svc's gRPC face: Envoy's ext_authz Check, ListTiers and GetKeyWindow.

Check reads the trusted x-ts-* headers auth_svc set (Envoy strips client copies):
an API key is counted against its tier, a dashboard session against its account's
session limit (and a route's own limit, when its policy names one: card set-ups),
and anything else reached the filter around auth and is refused. ClientLimits keeps
the limits on clients for auth_svc (signups, failed logins, verification mails).
"""
import hashlib
import logging
import urllib.parse

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2
from tokens.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from common import authz, errors, grpcserver, logs
from ratelimit_svc import config, domain, limits, metrics, store, tiers

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
    ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimits"].full_name,
    ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimitAdmin"].full_name,
    ratelimit_pb2.DESCRIPTOR.services_by_name["ClientLimits"].full_name,
)
# Health entry that is NOT_SERVING while windows are kept in memory; "" stays SERVING.
REDIS_HEALTH = "redis"

LIMIT = "x-ratelimit-limit-requests"
REMAINING = "x-ratelimit-remaining-requests"
RESET = "x-ratelimit-reset-requests"
KEY_ID_CHARS_MAX = 256
HITS_MAX = 8
SUBJECT_CHARS_MAX = 320
# The route's own limit on session calls, from the policy table (devtool/envoy_config.py).
ROUTE_LIMIT = "limit"

_UNCOUNTED = authz.allow()
# Only a call that went around auth_svc (a misrouted filter chain) lacks the
# trusted headers; the caller is told what a caller can do about it.
_UNAUTHENTICATED = errors.Unauthenticated(
    "Missing or unverified API key: send your API key as 'Authorization: Bearer YOUR_API_KEY'.")


class Answers:
    """Every constant piece of an answer, built once: header objects, and one
    denial per (tier, Retry-After, gRPC or not), of which at most
    len(TIERS) * WINDOW_S * 2 exist."""

    def __init__(self, public_base_url: str) -> None:
        self._base_url = public_base_url
        self.limit = {tier.name: authz.header(LIMIT, str(tier.requests_per_minute)) for tier in tiers.TIERS}
        self.remaining = tuple(authz.header(REMAINING, str(n)) for n in range(tiers.LIMIT_MAX + 1))
        self._denials: dict[tuple[str, int, bool], external_auth_pb2.CheckResponse] = {}
        self.unauthenticated_http = authz.deny(_UNAUTHENTICATED, _http(""))
        self.unauthenticated_grpc = authz.deny(_UNAUTHENTICATED, _http("application/grpc"))

    def allowed(self, tier: tiers.Tier, decision: domain.Decision) -> external_auth_pb2.CheckResponse:
        return authz.allow(response=(self.limit[tier.name], self.remaining[decision.remaining],
                                     authz.header(RESET, str(decision.reset_s))))

    def limited(self, tier: tiers.Tier, decision: domain.Decision, http_request) -> external_auth_pb2.CheckResponse:
        grpc_caller = authz.is_grpc(http_request)
        cache_key = (tier.name, decision.retry_after_s, grpc_caller)
        template = self._denials.get(cache_key)
        if template is None:
            template = self._denials[cache_key] = self._denial(tier, decision.retry_after_s, http_request)
        answer = external_auth_pb2.CheckResponse()
        answer.CopyFrom(template)
        answer.denied_response.headers.append(authz.header(RESET, str(decision.reset_s)))
        return answer

    def _denial(self, tier: tiers.Tier, retry_after_s: int, http_request) -> external_auth_pb2.CheckResponse:
        error = errors.RateLimited(self.message(tier, retry_after_s), retry_after_s=retry_after_s)
        extra = (self.limit[tier.name], self.remaining[0], authz.header("retry-after", str(retry_after_s)))
        return authz.deny(error, http_request, extra=extra)

    def message(self, tier: tiers.Tier, retry_after_s: int) -> str:
        seconds = "1 second" if retry_after_s == 1 else f"{retry_after_s} seconds"
        if tier is tiers.HIGHEST:
            way_up = "or email support@flex.ai for a higher limit"
        else:
            way_up = f"or request an upgrade from the dashboard ({self._base_url}/dashboard) or email support@flex.ai"
        return (f"Rate limit reached for requests: the {tier.name} tier allows "
                f"{tier.requests_per_minute} requests per minute. Retry after {seconds}, {way_up}.")


def _http(content_type: str) -> attribute_context_pb2.AttributeContext.HttpRequest:
    request = attribute_context_pb2.AttributeContext.HttpRequest()
    if content_type:
        request.headers["content-type"] = content_type
    return request


def subject_digest(subject: str) -> str:
    """What a window is keyed by: no address or email in Redis, and a bounded key."""
    return hashlib.sha256(subject.encode()).hexdigest()[:32]


class ClientWindows:
    """The limits of limits.py over the window store, at this service's configured counts."""

    def __init__(self, settings: config.Settings, windows: store.WindowStore) -> None:
        self._settings = settings
        self._windows = windows

    def count(self, limit: limits.ClientLimit) -> int:
        return self._settings.client_limit(limit)

    async def take(self, limit: limits.ClientLimit, subject: str) -> tuple[domain.Decision | None, store.Receipt | None]:
        """(None, None) when the limit is off."""
        count = self.count(limit)
        if count <= 0:
            return None, None
        return await self._windows.take(limits.window_key(limit, subject_digest(subject)), count,
                                        limit.window_s * 1000)

    async def release(self, receipts: list[store.Receipt]) -> None:
        for receipt in receipts:
            await self._windows.release(receipt)


def _too_many_session_calls(limit: limits.ClientLimit, count: int, retry_after_s: int) -> errors.RateLimited:
    seconds = "1 second" if retry_after_s == 1 else f"{retry_after_s} seconds"
    return errors.RateLimited(
        f"Too many {limit.counts} for this account: at most {count} in {limits.describe_window(limit.window_s)}. "
        f"Retry after {seconds}.", retry_after_s=retry_after_s)


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, windows: store.WindowStore, answers: Answers, clock: domain.Clock | None,
                 clients: ClientWindows | None = None) -> None:
        self._windows = windows
        self._answers = answers
        self._clock = clock
        self._clients = clients

    async def Check(self, request, context):
        http_request = request.attributes.request.http
        headers = http_request.headers
        auth = headers.get("x-ts-auth")
        if auth == "key":
            key_id = headers.get("x-ts-key")
            if key_id:
                tier = tiers.lookup(headers.get("x-ts-tier", ""))
                now_ms = None if self._clock is None else self._clock()
                decision = await self._windows.hit(key_id, tier.requests_per_minute, now_ms)
                if decision.allowed:
                    metrics.ALLOWED.inc()
                    return self._answers.allowed(tier, decision)
                metrics.LIMITED.inc()
                return self._answers.limited(tier, decision, http_request)
        elif auth == "session":
            account_id = headers.get("x-ts-account")
            if account_id:
                return await self._session(account_id, request, http_request)
        elif auth == "none":
            # Anonymous calls that auth_svc let through on a route open to them (image URLs,
            # unknown paths): each is limited where it does its work, if anywhere.
            return _UNCOUNTED
        metrics.UNAUTHENTICATED.inc()
        log.debug("refused a call without trusted auth headers", extra={"auth": auth or ""})
        if authz.is_grpc(http_request):
            return self._answers.unauthenticated_grpc
        return self._answers.unauthenticated_http


    async def _session(self, account_id: str, request, http_request):
        """A person at the dashboard: the account's session limit, then the route's own."""
        if self._clients is None:
            return _UNCOUNTED
        names = [limits.SESSION_CALLS_PER_ACCOUNT.name]
        route_limit = request.attributes.context_extensions.get(ROUTE_LIMIT, "")
        if route_limit:
            names.append(route_limit)
        for name in names:
            limit = limits.BY_NAME[name]
            decision, _receipt = await self._clients.take(limit, account_id)
            if decision is not None and not decision.allowed:
                metrics.LIMITED.inc()
                error = _too_many_session_calls(limit, decision.limit, decision.retry_after_s)
                return authz.deny(error, http_request,
                                  extra=(authz.header("retry-after", str(decision.retry_after_s)),))
        return _UNCOUNTED


class ClientLimitsServicer(ratelimit_pb2_grpc.ClientLimitsServicer):
    def __init__(self, clients: ClientWindows) -> None:
        self._clients = clients

    async def Take(self, request, context):
        if len(request.hits) > HITS_MAX:
            raise errors.InvalidRequest(f"at most {HITS_MAX} hits per call", param="hits")
        checked = []
        for hit in request.hits:
            limit = limits.BY_NAME.get(hit.limit)
            if limit is None:
                raise errors.InvalidRequest(f"no client limit {hit.limit!r}", param="limit")
            if not hit.subject or len(hit.subject) > SUBJECT_CHARS_MAX:
                raise errors.InvalidRequest(f"subject must be 1 to {SUBJECT_CHARS_MAX} characters", param="subject")
            checked.append((limit, hit.subject))
        receipts: list[store.Receipt] = []
        for limit, subject in checked:
            decision, receipt = await self._clients.take(limit, subject)
            if decision is None:
                continue
            if not decision.allowed:
                metrics.LIMITED.inc()
                await self._clients.release(receipts)
                return ratelimit_pb2.TakeResponse(allowed=False, retry_after_s=decision.retry_after_s,
                                                  refused_by=limit.name)
            receipts.append(receipt)
        metrics.ALLOWED.inc()
        return ratelimit_pb2.TakeResponse(allowed=True, receipts=[
            ratelimit_pb2.Receipt(key=r.key_id, member=r.member, at_ms=r.at_ms) for r in receipts])

    async def Release(self, request, context):
        if len(request.receipts) > HITS_MAX:
            raise errors.InvalidRequest(f"at most {HITS_MAX} receipts per call", param="receipts")
        # Only windows of client limits can be released: never an API key's.
        await self._clients.release([store.Receipt(r.key, r.member, r.at_ms) for r in request.receipts
                                     if r.key.startswith(limits.KEY_PREFIX)])
        return ratelimit_pb2.ReleaseResponse()


class RateLimits(ratelimit_pb2_grpc.RateLimitsServicer):
    def __init__(self) -> None:
        self._tiers = ratelimit_pb2.ListTiersResponse(
            data=[ratelimit_pb2.Tier(name=t.name, title=t.title, requests_per_minute=t.requests_per_minute)
                  for t in tiers.TIERS],
            window_seconds=tiers.WINDOW_S)

    async def ListTiers(self, request, context):
        return self._tiers


class RateLimitAdmin(ratelimit_pb2_grpc.RateLimitAdminServicer):
    def __init__(self, windows: store.WindowStore, clock: domain.Clock | None) -> None:
        self._windows = windows
        self._clock = clock

    async def GetKeyWindow(self, request, context):
        if not request.key_id or len(request.key_id) > KEY_ID_CHARS_MAX:
            raise errors.InvalidRequest(f"key_id must be 1 to {KEY_ID_CHARS_MAX} characters", param="key_id")
        tier = tiers.lookup(request.tier)
        now_ms = None if self._clock is None else self._clock()
        decision = await self._windows.peek(request.key_id, tier.requests_per_minute, now_ms)
        return ratelimit_pb2.KeyWindow(key_id=request.key_id, limit=decision.limit, used=decision.used,
                                       remaining=decision.remaining, reset=decision.reset_s,
                                       backend=self._windows.backend)


def build_server(settings: config.Settings, windows: store.WindowStore,
                 clock: domain.Clock | None = None) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """The server, bound but not started. `clock` pins decisions to its time
    (tests); without it the store's time is used (Redis TIME, shared by replicas).
    A store that can degrade (one with listen()) drives the "redis" health entry."""
    server, health_servicer = grpcserver.create(SERVICE_NAMES)
    clients = ClientWindows(settings, windows)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        Authorization(windows, Answers(settings.public_base_url), clock, clients), server)
    ratelimit_pb2_grpc.add_ClientLimitsServicer_to_server(ClientLimitsServicer(clients), server)
    ratelimit_pb2_grpc.add_RateLimitsServicer_to_server(RateLimits(), server)
    ratelimit_pb2_grpc.add_RateLimitAdminServicer_to_server(RateLimitAdmin(windows, clock), server)
    listen = getattr(windows, "listen", None)
    if listen is not None:
        async def report(degraded: bool) -> None:
            status = health_pb2.HealthCheckResponse.NOT_SERVING if degraded \
                else health_pb2.HealthCheckResponse.SERVING
            await health_servicer.set(REDIS_HEALTH, status)
        listen(report)
    port = grpcserver.bind(server, settings.server.host, settings.server.port, settings.server.tls)
    return server, port, health_servicer


def open_store(settings: config.Settings) -> store.FailoverWindowStore:
    redis_windows = store.open_redis(settings.redis_url, cluster=settings.redis_cluster,
                                     timeout_s=settings.redis_timeout_ms / 1000,
                                     connections_max=settings.redis_connections_max)
    return store.FailoverWindowStore(redis_windows, store.MemoryWindowStore(keys_max=settings.memory_keys_max),
                                     probe_s=settings.redis_probe_s)


def _redis_address(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"


async def main(settings: config.Settings) -> None:
    logs.setup("ratelimit_svc", settings.server.log_level)
    windows = open_store(settings)
    server, port, health_servicer = build_server(settings, windows)
    # Redis down at start-up is not fatal: the store starts degraded and probes.
    await windows.start()
    log.info("serving", extra={"host": settings.server.host, "port": port,
                               "redis": _redis_address(settings.redis_url), "backend": windows.backend})
    await grpcserver.run_until_signal(server, health_servicer, SERVICE_NAMES, settings.server,
                                      on_stop=windows.close)
