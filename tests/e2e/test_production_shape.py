"""The production shape on this machine: two replicas of every service behind
Envoy, on PostgreSQL (a schema per service) and a Redis server, the same
topology `./dev up --replicas 2` runs and docker-compose.yml describes."""
import asyncio
import os

import httpx
import openai
import pytest

from devtool import admin, up
from tests.e2e.conftest import POSTGRES_URL, assert_openai_error, mesh_config, session_of, signup

pytestmark = pytest.mark.postgres
REDIS_URL = os.environ.get("TOKENS_TEST_REDIS_URL", "")
CHAT = {"model": "ref-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if not POSTGRES_URL:
        pytest.skip("set TOKENS_TEST_POSTGRES_URL to run the PostgreSQL production shape")
    with up.postgres_settings(POSTGRES_URL, "e2e") as settings:
        config = mesh_config(tmp_path_factory.mktemp("prod"), replicas=2, redis_url=REDIS_URL or None, **settings)
        instance = up.Mesh(config)
        instance.start(timeout_s=90)
        yield instance
        instance.stop()


def run_admin(mesh, *argv) -> None:
    os.environ["TOKENS_DATA_DIR"] = str(mesh.config.data_dir)
    admin.main(list(argv))


def balance_nanos(mesh, account_id: str) -> int:
    from tokens.ledger.v1 import ledger_pb2
    os.environ["TOKENS_DATA_DIR"] = str(mesh.config.data_dir)
    reply = asyncio.run(admin._call("ledger", "LedgerStub", "GetBalance",
                                    ledger_pb2.GetBalanceRequest(account_id=account_id)))
    return reply.balance_nanos


def journal_sum(mesh) -> int:
    from tokens.ledger.v1 import ledger_pb2
    os.environ["TOKENS_DATA_DIR"] = str(mesh.config.data_dir)
    return asyncio.run(admin._call("ledger", "LedgerStub", "GetJournalStats",
                                   ledger_pb2.GetJournalStatsRequest())).sum_of_balances_nanos


def test_two_healthy_replicas_of_everything(mesh):
    hosts = mesh.envoy_hosts()
    for cluster in ("auth", "ratelimit", "ledger", "router"):
        assert hosts[cluster] == ["healthy", "healthy"], hosts


def test_calls_work_across_replicas(base_url):
    customer = signup(base_url)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=customer.api_key, max_retries=0)
    for _ in range(4):
        assert client.chat.completions.create(**CHAT).usage.completion_tokens == 2
    chunks = list(client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 2


def test_a_revocation_on_one_replica_holds_on_every_replica_at_once(base_url):
    customer = signup(base_url)
    session = session_of(base_url, customer)
    created = httpx.post(f"{base_url}/v1/keys", headers=session, json={"name": "short-lived"}).json()
    second = {"Authorization": f"Bearer {created['secret']}"}
    for _ in range(4):  # warm both replicas' caches with the key
        assert httpx.get(f"{base_url}/v1/models", headers=second).status_code == 200
    assert httpx.delete(f"{base_url}/v1/keys/{created['key']['id']}", headers=session).status_code == 200
    for _ in range(10):
        assert_openai_error(httpx.get(f"{base_url}/v1/models", headers=second), 401, "invalid_api_key")


async def test_the_limit_is_exact_across_both_ratelimit_replicas(base_url):
    customer = signup(base_url)
    async with httpx.AsyncClient(timeout=30) as client:
        replies = await asyncio.gather(*[client.post(f"{base_url}/v1/chat/completions", headers=customer.auth,
                                                     json={**CHAT, "max_tokens": 1}) for _ in range(30)])
    assert sorted(r.status_code for r in replies) == [200] * 10 + [429] * 20


def test_two_ledger_replicas_keep_the_balance_floor_and_the_books_balanced(mesh, base_url):
    customer = signup(base_url)
    run_admin(mesh, "account-tier", customer.account_id, "paid")
    # Leave about the worst case of one call: then at most a few calls fit.
    run_admin(mesh, "credit", customer.account_id, "-9.999", "--reason", "test: nearly empty")
    request = {**CHAT, "max_tokens": 4096}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(f"{base_url}/v1/chat/completions", headers=customer.auth,
                                                      json=request) for _ in range(40)])

    codes = [r.status_code for r in asyncio.run(burst())]
    assert set(codes) <= {200, 402} and 402 in codes and 200 in codes
    # Worst case of one call: the input's bytes plus framing, and 4096 output tokens.
    worst = 500 * (len("Hello".encode()) + 8 + 8) + 1500 * 4096
    import time
    time.sleep(1)
    assert balance_nanos(mesh, customer.account_id) >= -worst
    assert journal_sum(mesh) == 0
    usage = httpx.get(f"{base_url}/v1/usage", headers=customer.auth, params={"limit": 100}).json()
    assert len(usage["data"]) == codes.count(200)
    assert len({row["request_id"] for row in usage["data"]}) == codes.count(200)
