"""ratelimit_svc built with build_server on port 0, called through its real stubs
with CheckRequests shaped like the ones Envoy's ext_authz filter sends."""
import base64
import dataclasses
import json
import uuid

import grpc
import prometheus_client
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokens.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from common import config as common_config
from ratelimit_svc import config, limits, server, store, tiers
from tests.conftest import free_port

T0_MS = 1_700_000_000_000
T0_S = T0_MS // 1000


class FakeClock:
    def __init__(self) -> None:
        self.now_ms = T0_MS

    def __call__(self) -> int:
        return self.now_ms


def settings_for(redis_url: str) -> config.Settings:
    listen = common_config.ServerSettings(host="127.0.0.1", port=0, log_level="INFO", drain_s=0.0, grace_s=0.0)
    return config.Settings(server=listen, redis_url=redis_url, redis_timeout_ms=1000, redis_probe_s=0.05)


@dataclasses.dataclass
class Served:
    authz: external_auth_pb2_grpc.AuthorizationStub
    tiers: ratelimit_pb2_grpc.RateLimitsStub
    admin: ratelimit_pb2_grpc.RateLimitAdminStub
    health: health_pb2_grpc.HealthStub
    clock: FakeClock
    windows: store.FailoverWindowStore
    target: str = ""


async def serve(redis_url: str):
    settings = settings_for(redis_url)
    windows = server.open_store(settings)
    clock = FakeClock()
    grpc_server, port, _ = server.build_server(settings, windows, clock)
    await grpc_server.start()
    await windows.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    served = Served(external_auth_pb2_grpc.AuthorizationStub(channel), ratelimit_pb2_grpc.RateLimitsStub(channel),
                    ratelimit_pb2_grpc.RateLimitAdminStub(channel), health_pb2_grpc.HealthStub(channel),
                    clock, windows, f"127.0.0.1:{port}")

    async def stop() -> None:
        await channel.close()
        await grpc_server.stop(0)
        await windows.close()

    return served, stop


@pytest.fixture
async def svc(redis_server):
    served, stop = await serve(redis_server)
    yield served
    await stop()


@pytest.fixture
async def svc_without_redis():
    # Nothing listens on this port: the service must start and serve degraded.
    served, stop = await serve(f"redis://127.0.0.1:{free_port()}/0")
    yield served
    await stop()


def check_request(headers: dict[str, str], *, content_type: str = "application/json",
                  path: str = "/v1/chat/completions", method: str = "POST") -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.id, http.method, http.path, http.host = "1234", method, path, "tokens.flex.ai"
    http.scheme, http.protocol = "http", "HTTP/1.1"
    http.headers.update({":authority": "tokens.flex.ai", ":method": method, ":path": path,
                         "content-type": content_type, "authorization": "Bearer sk-hidden",
                         "x-request-id": str(uuid.uuid4()), **headers})
    return request


def key_headers(key_id: str, tier: str = "free") -> dict[str, str]:
    return {"x-ts-auth": "key", "x-ts-account": "acct_1", "x-ts-key": key_id, "x-ts-tier": tier}


def new_key() -> str:
    return f"key_{uuid.uuid4().hex[:12]}"


def header_map(options) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


async def test_allowed_calls_count_down_then_429(svc):
    key_id = new_key()
    remaining = []
    for _ in range(10):
        answer = await svc.authz.Check(check_request(key_headers(key_id)))
        assert answer.status.code == code_pb2.OK
        assert answer.WhichOneof("http_response") == "ok_response"
        added = header_map(answer.ok_response.response_headers_to_add)
        assert added["x-ratelimit-limit-requests"] == "10"
        assert added["x-ratelimit-reset-requests"] == str(T0_S + 60)
        remaining.append(added["x-ratelimit-remaining-requests"])
        # Nothing is forwarded upstream or removed: only response headers.
        assert not answer.ok_response.headers and not answer.ok_response.headers_to_remove
    assert remaining == [str(n) for n in range(9, -1, -1)]

    svc.clock.now_ms = T0_MS + 7_500
    denied = await svc.authz.Check(check_request(key_headers(key_id)))
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert denied.WhichOneof("http_response") == "denied_response"
    assert denied.denied_response.status.code == 429
    headers = header_map(denied.denied_response.headers)
    assert headers["retry-after"] == "53"
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == str(T0_S + 60)
    assert headers["content-type"] == "application/json"
    assert "grpc-status" not in headers
    body = json.loads(denied.denied_response.body)
    assert body == {"error": {
        "message": "Rate limit reached for requests: the free tier allows 10 requests per minute. "
                   "Retry after 53 seconds, or request an upgrade from the dashboard "
                   "(https://tokens.flex.ai/dashboard) or email support@flex.ai.",
        "type": "requests", "param": None, "code": "rate_limit_exceeded"}}

    # One ms early is still full; at exactly a window after the ten calls (all made
    # at T0) they all leave, and the refusals at 7.5 s and 59.999 s used nothing.
    svc.clock.now_ms = T0_MS + 59_999
    assert (await svc.authz.Check(check_request(key_headers(key_id)))).denied_response.status.code == 429
    svc.clock.now_ms = T0_MS + 60_000
    again = await svc.authz.Check(check_request(key_headers(key_id)))
    assert again.WhichOneof("http_response") == "ok_response"
    assert header_map(again.ok_response.response_headers_to_add)["x-ratelimit-remaining-requests"] == "9"


async def test_tier_header_sets_the_limit_and_unknown_tiers_are_free(svc):
    for tier, limit in (("elevated", "60"), ("paid", "300"), ("platinum", "10"), ("", "10")):
        answer = await svc.authz.Check(check_request(key_headers(new_key(), tier)))
        added = header_map(answer.ok_response.response_headers_to_add)
        assert added["x-ratelimit-limit-requests"] == limit
        assert added["x-ratelimit-remaining-requests"] == str(int(limit) - 1)


async def test_session_calls_count_against_the_account_not_the_key(svc):
    key_id, account = new_key(), f"acct_{uuid.uuid4().hex[:8]}"
    session = {"x-ts-auth": "session", "x-ts-account": account, "x-ts-key": key_id, "x-ts-tier": "free"}
    limit = limits.SESSION_CALLS_PER_ACCOUNT.limit
    for _ in range(limit):
        answer = await svc.authz.Check(check_request(session, method="GET", path="/v1/account"))
        assert answer.status.code == code_pb2.OK
        assert answer.ok_response == external_auth_pb2.OkHttpResponse()
    refused = await svc.authz.Check(check_request(session, method="GET", path="/v1/account"))
    assert refused.denied_response.status.code == 429
    headers = header_map(refused.denied_response.headers)
    assert 1 <= int(headers["retry-after"]) <= 60
    error = json.loads(refused.denied_response.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and "dashboard session" in error["message"]
    # Another account's session, an anonymous call and the key itself are untouched.
    other = dict(session, **{"x-ts-account": "acct_other_" + uuid.uuid4().hex[:6]})
    assert (await svc.authz.Check(check_request(other, method="GET", path="/v1/account"))).status.code == code_pb2.OK
    anonymous = await svc.authz.Check(check_request({"x-ts-auth": "none"}, method="GET", path="/nowhere"))
    assert anonymous.status.code == code_pb2.OK and anonymous.ok_response == external_auth_pb2.OkHttpResponse()
    first_key_call = await svc.authz.Check(check_request(key_headers(key_id)))
    assert header_map(first_key_call.ok_response.response_headers_to_add)["x-ratelimit-remaining-requests"] == "9"


async def test_a_route_limit_applies_to_session_calls_on_that_route(svc):
    session = {"x-ts-auth": "session", "x-ts-account": f"acct_{uuid.uuid4().hex[:8]}"}
    setups = []
    for _ in range(limits.CARD_SETUPS_PER_ACCOUNT.limit + 1):
        request = check_request(session, path="/v1/billing/setup-intents")
        request.attributes.context_extensions["limit"] = limits.CARD_SETUPS_PER_ACCOUNT.name
        setups.append(await svc.authz.Check(request))
    assert [a.status.code == code_pb2.OK for a in setups] == [True] * limits.CARD_SETUPS_PER_ACCOUNT.limit + [False]
    assert "card set-ups" in json.loads(setups[-1].denied_response.body)["error"]["message"]
    assert int(header_map(setups[-1].denied_response.headers)["retry-after"]) > 60  # an hour's window


async def test_client_limits_take_all_or_nothing_and_release(svc, redis_server):
    channel = grpc.aio.insecure_channel(svc.target)
    stub = ratelimit_pb2_grpc.ClientLimitsStub(channel)
    address, email = f"10.0.0.{uuid.uuid4().int % 250}", f"{uuid.uuid4().hex[:8]}@example.com"
    hits = [ratelimit_pb2.ClientHit(limit="login_failures_per_email", subject=email),
            ratelimit_pb2.ClientHit(limit="login_failures_per_address", subject=address)]
    taken = [await stub.Take(ratelimit_pb2.TakeRequest(hits=hits)) for _ in range(11)]
    assert [t.allowed for t in taken] == [True] * 10 + [False]
    assert taken[-1].refused_by == "login_failures_per_email" and 1 <= taken[-1].retry_after_s <= 900
    # The refusal took back the address's hit it had admitted: 10 counted there, not 11.
    other = ratelimit_pb2.ClientHit(limit="login_failures_per_address", subject=address)
    counted = [await stub.Take(ratelimit_pb2.TakeRequest(hits=[other])) for _ in range(21)]
    assert [t.allowed for t in counted] == [True] * 20 + [False]
    # Released hits stop counting: the email admits again.
    await stub.Release(ratelimit_pb2.ReleaseRequest(receipts=taken[0].receipts[:1]))
    again = await stub.Take(ratelimit_pb2.TakeRequest(hits=hits[:1]))
    assert again.allowed
    # Nothing but client windows can be released, and no address or email is a Redis key.
    await stub.Release(ratelimit_pb2.ReleaseRequest(receipts=[ratelimit_pb2.Receipt(key="key_x", member="m")]))
    import redis.asyncio
    client = redis.asyncio.from_url(redis_server)
    try:
        names = [k.decode() async for k in client.scan_iter("ratelimit:v1:{client:*")]
    finally:
        await client.aclose()
    assert names and not any(email in n or address in n for n in names)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Take(ratelimit_pb2.TakeRequest(hits=[ratelimit_pb2.ClientHit(limit="nope", subject="x")]))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()


async def test_a_limit_set_to_zero_is_off(redis_server):
    settings = dataclasses.replace(settings_for(redis_server), client_limits={"signups_per_address": 0})
    windows = server.open_store(settings)
    grpc_server, port, _ = server.build_server(settings, windows)
    await grpc_server.start()
    await windows.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ratelimit_pb2_grpc.ClientLimitsStub(channel)
            hit = ratelimit_pb2.ClientHit(limit="signups_per_address", subject="10.1.1.1")
            answers = [await stub.Take(ratelimit_pb2.TakeRequest(hits=[hit])) for _ in range(8)]
        assert all(a.allowed and not a.receipts for a in answers)
    finally:
        await grpc_server.stop(0)
        await windows.close()


@pytest.mark.parametrize("headers", [
    {},
    {"x-ts-auth": "key", "x-ts-tier": "paid"},                   # no key id
    {"x-ts-auth": "key", "x-ts-key": "", "x-ts-tier": "paid"},
    {"x-ts-auth": "admin", "x-ts-key": "key_1"},
    {"x-ts-key": "key_1", "x-ts-tier": "paid"},                  # no x-ts-auth
])
async def test_missing_trusted_headers_are_denied_401(svc, headers):
    answer = await svc.authz.Check(check_request(headers))
    assert answer.WhichOneof("http_response") == "denied_response"
    assert answer.denied_response.status.code == 401
    body = json.loads(answer.denied_response.body)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert not any(key.startswith("x-ratelimit") for key in header_map(answer.denied_response.headers))


async def test_native_grpc_callers_get_resource_exhausted_with_retry_info(svc):
    key_id = new_key()
    grpc_call = dict(content_type="application/grpc", path="/tokens.router.v1.Router/ChatCompletion")
    for _ in range(10):
        await svc.authz.Check(check_request(key_headers(key_id), **grpc_call))
    svc.clock.now_ms = T0_MS + 30_000
    denied = await svc.authz.Check(check_request(key_headers(key_id), **grpc_call))
    headers = header_map(denied.denied_response.headers)
    assert denied.denied_response.status.code == 429
    assert headers["grpc-status"] == "8"
    assert headers["retry-after"] == "30"
    details_b64 = headers["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(details_b64 + "=" * (-len(details_b64) % 4)))
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    retry = [error_details_pb2.RetryInfo.FromString(d.value) for d in status.details
             if d.type_url.endswith("google.rpc.RetryInfo")]
    assert retry[0].retry_delay.seconds == 30

    unauthenticated = await svc.authz.Check(check_request({}, **grpc_call))
    assert header_map(unauthenticated.denied_response.headers)["grpc-status"] == str(code_pb2.UNAUTHENTICATED)


def decisions_total(result: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value("ratelimit_decisions_total", {"result": result}) or 0.0


async def test_decisions_are_counted_in_metrics(svc):
    before = {result: decisions_total(result) for result in ("allowed", "limited", "unauthenticated")}
    key_id = new_key()
    for _ in range(12):
        await svc.authz.Check(check_request(key_headers(key_id)))
    await svc.authz.Check(check_request({}))
    # A session without its account never comes from auth_svc: refused like a missing key.
    await svc.authz.Check(check_request({"x-ts-auth": "session"}))
    after = {result: decisions_total(result) for result in before}
    assert {result: after[result] - before[result] for result in before} == {
        "allowed": 10, "limited": 2, "unauthenticated": 2}


async def test_list_tiers(svc):
    listed = await svc.tiers.ListTiers(ratelimit_pb2.ListTiersRequest())
    assert listed.window_seconds == 60
    assert [(t.name, t.title, t.requests_per_minute) for t in listed.data] == [
        ("free", "Free (default on signup)", 10),
        ("elevated", "Elevated (approved users)", 60),
        ("paid", "Paid", 300),
    ]


async def test_get_key_window(svc):
    key_id = new_key()
    for _ in range(3):
        await svc.authz.Check(check_request(key_headers(key_id, "elevated")))
    svc.clock.now_ms = T0_MS + 1_000
    window = await svc.admin.GetKeyWindow(ratelimit_pb2.GetKeyWindowRequest(key_id=key_id, tier="elevated"))
    assert window == ratelimit_pb2.KeyWindow(key_id=key_id, limit=60, used=3, remaining=57,
                                             reset=T0_S + 60, backend="redis")
    # Looking does not count.
    again = await svc.admin.GetKeyWindow(ratelimit_pb2.GetKeyWindowRequest(key_id=key_id, tier="elevated"))
    assert again.used == 3
    as_free = await svc.admin.GetKeyWindow(ratelimit_pb2.GetKeyWindowRequest(key_id=key_id))
    assert (as_free.limit, as_free.remaining) == (10, 7)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await svc.admin.GetKeyWindow(ratelimit_pb2.GetKeyWindowRequest(key_id=""))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_reports_redis(svc):
    overall = await svc.health.Check(health_pb2.HealthCheckRequest(service=""))
    redis = await svc.health.Check(health_pb2.HealthCheckRequest(service="redis"))
    assert overall.status == redis.status == health_pb2.HealthCheckResponse.SERVING


async def test_serves_degraded_when_redis_is_down_at_start(svc_without_redis):
    svc = svc_without_redis
    redis = await svc.health.Check(health_pb2.HealthCheckRequest(service="redis"))
    overall = await svc.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert redis.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    key_id = new_key()
    answers = [await svc.authz.Check(check_request(key_headers(key_id))) for _ in range(11)]
    assert [a.WhichOneof("http_response") for a in answers] == ["ok_response"] * 10 + ["denied_response"]
    assert header_map(answers[0].ok_response.response_headers_to_add)["x-ratelimit-remaining-requests"] == "9"
    window = await svc.admin.GetKeyWindow(ratelimit_pb2.GetKeyWindowRequest(key_id=key_id))
    assert (window.used, window.backend) == (10, "memory")


def test_the_highest_tier_is_told_to_write_to_support():
    answers = server.Answers("https://example.test")
    assert answers.message(tiers.PAID, 1) == (
        "Rate limit reached for requests: the paid tier allows 300 requests per minute. "
        "Retry after 1 second, or email support@flex.ai for a higher limit.")
    assert "(https://example.test/dashboard)" in answers.message(tiers.ELEVATED, 5)
