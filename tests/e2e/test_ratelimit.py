"""Rate limits end to end: two ratelimit_svc replicas sharing one Redis behind the
real Envoy, driven with httpx (HTTP/JSON) and grpcio (native gRPC).

The numbers are the documented ones (docs: Free 10 requests per minute, Elevated
60), not read from ratelimit_svc.tiers, so a change to the table shows up here.
"""
import asyncio
import json
import signal
import time

import grpc
import httpx
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokens.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from tokens.router.v1 import router_pb2, router_pb2_grpc

from common import errors, tls
from devtool import up
from tests.e2e.conftest import PASSWORD, assert_openai_error, mesh_config, session_of, signup

REPLICAS = 2
FREE_LIMIT = 10
ELEVATED_LIMIT = 60
WINDOW_S = 60
BURST = 30
CHAT = {"model": "ref-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
LIMIT = "x-ratelimit-limit-requests"
REMAINING = "x-ratelimit-remaining-requests"
RESET = "x-ratelimit-reset-requests"
# Bound on waiting for the replicas to go back to Redis after it restarts (they probe every second).
RECOVERY_S_MAX = 15.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    config = mesh_config(tmp_path_factory.mktemp("ratelimit-mesh"), replicas_of={"ratelimit_svc": REPLICAS})
    instance = up.Mesh(config)
    instance.start()
    yield instance
    instance.stop()


# Helpers

def chat(base_url: str, auth: dict[str, str], **fields) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", headers=auth, json={**CHAT, **fields}, timeout=30)


async def burst(base_url: str, auth: dict[str, str], count: int = BURST) -> list[httpx.Response]:
    """`count` chat calls sent at once, each on its own connection."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base_url, headers=auth, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(count)))


def replica_ports(mesh: up.Mesh) -> list[int]:
    return [mesh.config.grpc_port("ratelimit_svc", r) for r in range(REPLICAS)]


def checks_by_replica(mesh: up.Mesh) -> dict[int, int]:
    """Check calls Envoy has sent to each ratelimit replica so far, by port: the
    host's rq_total in Envoy's admin (its health checks are not counted there)."""
    reply = httpx.get(f"http://127.0.0.1:{mesh.config.admin_port}/clusters?format=json", timeout=5)
    cluster = next(c for c in reply.json()["cluster_statuses"] if c["name"] == "ratelimit")
    out = {}
    for host in cluster["host_statuses"]:
        stats = {s["name"]: int(s.get("value", 0)) for s in host["stats"]}
        out[host["address"]["socket_address"]["port_value"]] = stats.get("rq_total", 0)
    assert sorted(out) == sorted(replica_ports(mesh)), out
    return out


def redis_health(mesh: up.Mesh, port: int) -> int:
    """The replica's "redis" health entry: NOT_SERVING while it limits from memory."""
    with tls.blocking_channel(f"127.0.0.1:{port}", mesh.config.tls_files()) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="redis"), timeout=5)
    return reply.status


def key_window(mesh: up.Mesh, port: int, key_id: str) -> ratelimit_pb2.KeyWindow:
    """RateLimitAdmin.GetKeyWindow on one replica (internal: straight to its port, not through Envoy)."""
    with tls.blocking_channel(f"127.0.0.1:{port}", mesh.config.tls_files()) as channel:
        stub = ratelimit_pb2_grpc.RateLimitAdminStub(channel)
        return stub.GetKeyWindow(ratelimit_pb2.GetKeyWindowRequest(key_id=key_id, tier="free"), timeout=5)


def assert_reset_in_window(reply: httpx.Response) -> None:
    reset = reply.headers[RESET]
    assert reset.isdigit(), reset
    # Unix seconds (not a duration, not milliseconds) at most one window ahead.
    assert time.time() - 1 <= int(reset) <= time.time() + WINDOW_S + 1, (reset, time.time())


def assert_rate_limited(reply: httpx.Response, tier: str, limit: int) -> int:
    """The documented 429; returns its Retry-After."""
    error = assert_openai_error(reply, 429, "rate_limit_exceeded", "requests")
    retry_after = reply.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= WINDOW_S, retry_after
    message = error["message"]
    assert f"the {tier} tier allows {limit} requests per minute" in message, message
    assert f"Retry after {retry_after} second" in message and "upgrade" in message, message
    assert reply.headers[LIMIT] == str(limit) and reply.headers[REMAINING] == "0", reply.headers
    assert_reset_in_window(reply)
    return int(retry_after)


# Tests

async def test_a_burst_on_a_free_key_admits_exactly_ten_across_both_replicas(mesh, base_url, customer):
    # Envoy's round robin spreads a burst over both replicas; should it ever send one
    # burst to a single replica, a fresh key tries again (each burst must still be exact).
    for attempt in range(3):
        auth = customer.auth if attempt == 0 else signup(base_url).auth
        before = checks_by_replica(mesh)
        replies = await burst(base_url, auth)
        after = checks_by_replica(mesh)
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == FREE_LIMIT and statuses.count(429) == BURST - FREE_LIMIT, statuses
        decided = {port: after[port] - before[port] for port in after}
        # Only these calls reached the replicas.
        assert sum(decided.values()) == BURST, decided
        if all(n > 0 for n in decided.values()):
            break
    # Both replicas decided: one shared window, not one per replica.
    assert all(n > 0 for n in decided.values()), decided
    admitted = [r for r in replies if r.status_code == 200]
    # Each admission saw a different count: the window is updated atomically.
    assert sorted(int(r.headers[REMAINING]) for r in admitted) == list(range(FREE_LIMIT)), \
        [r.headers[REMAINING] for r in admitted]
    for reply in admitted:
        assert reply.headers[LIMIT] == str(FREE_LIMIT)
        assert_reset_in_window(reply)
    for reply in replies:
        if reply.status_code == 429:
            assert_rate_limited(reply, "free", FREE_LIMIT)


@pytest.mark.slow
@pytest.mark.timeout(WINDOW_S + 60)
def test_sequential_calls_count_down_and_retry_after_is_exact(base_url, customer):
    remaining = []
    for _ in range(FREE_LIMIT):
        reply = chat(base_url, customer.auth)
        assert reply.status_code == 200, reply.text
        assert reply.headers[LIMIT] == str(FREE_LIMIT)
        assert_reset_in_window(reply)
        remaining.append(int(reply.headers[REMAINING]))
    assert remaining == list(range(FREE_LIMIT - 1, -1, -1))

    retry_after = assert_rate_limited(chat(base_url, customer.auth), "free", FREE_LIMIT)
    # Not generous either: shortly before Retry-After the window is still full.
    if retry_after > 2:
        time.sleep(retry_after - 2)
        assert_rate_limited(chat(base_url, customer.auth), "free", FREE_LIMIT)
        time.sleep(2)
    else:
        time.sleep(retry_after)
    again = chat(base_url, customer.auth)
    assert again.status_code == 200, again.text
    assert again.headers[LIMIT] == str(FREE_LIMIT)


def test_a_second_key_of_the_same_account_has_its_own_window(base_url, customer):
    # Keys are made with a dashboard session (a person), which no key's window counts.
    created = httpx.post(f"{base_url}/v1/keys", headers=session_of(base_url, customer), json={"name": "second"},
                         timeout=30)
    assert created.status_code == 200, created.text
    assert REMAINING not in created.headers
    second = {"Authorization": f"Bearer {created.json()['secret']}"}
    for _ in range(FREE_LIMIT):
        assert chat(base_url, customer.auth).status_code == 200
    assert_rate_limited(chat(base_url, customer.auth), "free", FREE_LIMIT)

    reply = chat(base_url, second)
    assert reply.status_code == 200, reply.text
    assert reply.headers[LIMIT] == str(FREE_LIMIT) and reply.headers[REMAINING] == str(FREE_LIMIT - 1)
    # And the first key is still refused: the second one's call did not touch its window.
    assert_rate_limited(chat(base_url, customer.auth), "free", FREE_LIMIT)


def test_errors_from_later_filters_and_the_upstream_carry_the_headers(base_url, customer):
    bad = chat(base_url, customer.auth, max_tokens=-1)
    assert_openai_error(bad, 400, "invalid_value")
    unknown = chat(base_url, customer.auth, model="gpt-nonexistent")
    assert_openai_error(unknown, 404, "model_not_found")
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", headers=customer.auth,
                      json={**CHAT, "stream": True}, timeout=30) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["content-type"] == "text/event-stream"
        streamed.read()
    for reply, remaining in ((bad, 9), (unknown, 8), (streamed, 7)):
        assert reply.headers[LIMIT] == str(FREE_LIMIT), (reply.status_code, reply.headers)
        assert reply.headers[REMAINING] == str(remaining), (reply.status_code, reply.headers)
        assert_reset_in_window(reply)


def test_a_402_for_no_credit_carries_the_headers(base_url, customer, operator):
    operator("credit", customer.account_id, "-10", "--reason", "e2e: drain the signup credit")
    reply = chat(base_url, customer.auth)
    # The documented 402 body (no "param"), so not assert_openai_error.
    assert reply.status_code == 402 and reply.json()["error"]["type"] == "insufficient_quota", reply.text
    assert reply.headers[LIMIT] == str(FREE_LIMIT) and reply.headers[REMAINING] == str(FREE_LIMIT - 1)
    assert_reset_in_window(reply)


def test_an_operator_tier_change_applies_to_the_next_call(base_url, customer, operator):
    first = chat(base_url, customer.auth)
    assert first.headers[LIMIT] == str(FREE_LIMIT) and first.headers[REMAINING] == str(FREE_LIMIT - 1)
    operator("tier", customer.key_id, "elevated")
    reply = chat(base_url, customer.auth)
    assert reply.status_code == 200, reply.text
    # The new limit, and the calls already made still count.
    assert reply.headers[LIMIT] == str(ELEVATED_LIMIT) and reply.headers[REMAINING] == str(ELEVATED_LIMIT - 2)


def test_dashboard_calls_with_a_session_do_not_count(mesh, base_url, customer):
    session = httpx.post(f"{base_url}/v1/sessions", json={"email": customer.email, "password": PASSWORD},
                         timeout=30)
    assert session.status_code == 200, session.text
    bearer = {"Authorization": f"Bearer {session.json()['session_token']}"}
    # More than any Free window holds: had they counted, the last ones would be 429.
    for _ in range(FREE_LIMIT + 2):
        reply = httpx.get(f"{base_url}/v1/account", headers=bearer, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["id"] == customer.account_id
    for port in replica_ports(mesh):
        assert key_window(mesh, port, customer.key_id).used == 0
    reply = chat(base_url, customer.auth)
    assert reply.status_code == 200 and reply.headers[REMAINING] == str(FREE_LIMIT - 1), reply.headers


def test_native_grpc_caller_gets_resource_exhausted_with_retry_info(mesh, customer):
    request = router_pb2.CreateChatCompletionRequest(model="ref-chat", max_tokens=1)
    request.messages.add(role="user").content.string_value = "Hi over gRPC"
    auth = (("authorization", f"Bearer {customer.api_key}"),)
    with grpc.insecure_channel(f"127.0.0.1:{mesh.config.port}") as channel:
        stub = router_pb2_grpc.InferenceStub(channel)
        for n in range(FREE_LIMIT):
            _, call = stub.Chat.with_call(request, metadata=auth, timeout=10)
            headers = dict(call.initial_metadata())
            assert headers[LIMIT] == str(FREE_LIMIT) and headers[REMAINING] == str(FREE_LIMIT - 1 - n), headers
        with pytest.raises(grpc.RpcError) as caught:
            stub.Chat(request, metadata=auth, timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    assert json.loads(error.details())["error"]["code"] == "rate_limit_exceeded"
    trailers = dict(error.trailing_metadata())
    status = status_pb2.Status.FromString(trailers[errors.DETAILS_KEY])
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    retries = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retries) == 1, status.details
    retry = error_details_pb2.RetryInfo()
    retries[0].Unpack(retry)
    assert 1 <= retry.retry_delay.seconds <= WINDOW_S and retry.retry_delay.nanos == 0, retry


@pytest.mark.timeout(90)
async def test_redis_outage_limits_per_replica_then_recovers_by_itself(mesh, base_url):
    ports = replica_ports(mesh)
    during, after = signup(base_url), signup(base_url)
    mesh.stop_one("redis", signal.SIGKILL)
    try:
        before = checks_by_replica(mesh)
        replies = await burst(base_url, during.auth)
        decided = {port: n - before[port] for port, n in checks_by_replica(mesh).items()}
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 429}, statuses
        admitted = statuses.count(200)
        # Each replica limits on its own: never everything refused, never more than the limit per replica.
        assert FREE_LIMIT <= admitted <= REPLICAS * FREE_LIMIT, statuses
        assert all(n > 0 for n in decided.values()), decided
        windows = {port: key_window(mesh, port, during.key_id) for port in ports}
        for port in ports:
            assert redis_health(mesh, port) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert windows[port].backend == "memory"
            assert windows[port].used == min(FREE_LIMIT, decided[port]), (port, windows[port], decided)
        assert sum(w.used for w in windows.values()) == admitted
        for reply in replies:
            if reply.status_code == 429:
                assert_rate_limited(reply, "free", FREE_LIMIT)
    finally:
        mesh.start_redis()

    deadline = time.monotonic() + RECOVERY_S_MAX
    while not all(redis_health(mesh, port) == health_pb2.HealthCheckResponse.SERVING for port in ports):
        assert time.monotonic() < deadline, f"replicas still degraded {RECOVERY_S_MAX:.0f} s after Redis came back"
        await asyncio.sleep(0.2)
    for port in ports:
        window = key_window(mesh, port, during.key_id)
        assert window.backend == "redis"
        # What the replicas admitted from memory was copied into Redis, so it still counts.
        assert window.used == admitted, (window, admitted)
    replies = await burst(base_url, after.auth)
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == FREE_LIMIT and statuses.count(429) == BURST - FREE_LIMIT, statuses
