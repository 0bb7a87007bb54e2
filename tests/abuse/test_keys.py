"""Attacks with API keys, against the running mesh through Envoy (issue 15: a key that moves
its owner's money and keys, a Free account with 50 keys, revoke-and-create for fresh windows)."""
import concurrent.futures
import time

from ratelimit_svc import tiers
from tests.abuse.accounts_rig import abuse_inbox, abuse_mesh, attacker, operator, person  # noqa: F401  (fixtures)
from tests.e2e.conftest import assert_openai_error

# How long the churn attack runs: long enough for many revoke-and-create rounds, well inside
# the 60 s window the bound is about.
CHURN_S = 6.0


def test_an_api_key_cannot_move_money_or_manage_keys(attacker, person):
    owner = person()
    key = owner.auth
    attempts = [
        attacker.post("/v1/billing/topups", headers=key, json={"amount_usd": "10000.00", "payment_method": "pm_card_visa"}),
        attacker.post("/v1/billing/setup-intents", headers=key, json={}),
        attacker.post("/v1/billing/payment-methods", headers=key, json={"payment_method": "pm_card_visa"}),
        attacker.get("/v1/billing/payment-methods", headers=key),
        attacker.get("/v1/billing/topups", headers=key),
        attacker.post("/v1/keys", headers=key, json={"name": "stolen"}),
        attacker.delete(f"/v1/keys/{owner.key_id}", headers=key),
        attacker.post(f"/v1/keys/{owner.key_id}/revoke", headers=key, json={}),
        attacker.post("/v1/upgrade-requests", headers=key, json={"tier": "elevated"}),
    ]
    for reply in attempts:
        assert_openai_error(reply, 403, "session_required", "invalid_request_error")
    # Nothing moved: the balance is the grant, the key list is the first key, and it still works.
    account = attacker.get("/v1/account", headers=key)
    assert account.status_code == 200 and account.json()["balance_usd"] == "10.00"
    keys = attacker.get("/v1/keys", headers=owner.session).json()["data"]
    assert [k["id"] for k in keys] == [owner.key_id]
    assert attacker.get("/v1/billing/topups", headers=owner.session).json()["data"] == []
    # What a key may do: call models, read its account and usage.
    assert attacker.get("/v1/usage", headers=key).status_code == 200
    assert attacker.get("/v1/models", headers=key).status_code == 200


def test_fifty_keys_on_free_leave_three_live(attacker, person):
    owner = person()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda n: attacker.post("/v1/keys", headers=owner.session, json={"name": f"k{n}"}),
                                range(50)))
    made = [r for r in replies if r.status_code == 200]
    assert len(made) == tiers.FREE.keys_max - 1  # the signup's key is the first
    for reply in replies:
        if reply.status_code != 200:
            assert_openai_error(reply, 400, "too_many_keys")
    live = attacker.get("/v1/keys", headers=owner.session).json()["data"]
    assert len(live) == tiers.FREE.keys_max


def test_revoking_and_creating_keys_gives_no_fresh_windows(attacker, person):
    owner = person()
    keys = [owner.api_key] + [attacker.post("/v1/keys", headers=owner.session, json={"name": f"k{n}"}).json()["secret"]
                              for n in range(tiers.FREE.keys_max - 1)]
    admitted, refused_creations, started = 0, 0, time.monotonic()
    while time.monotonic() - started < CHURN_S:
        secret = keys.pop(0)
        while attacker.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200:
            admitted += 1
        key_id = next(k["id"] for k in attacker.get("/v1/keys", headers=owner.session).json()["data"]
                      if k["display"] == f"{secret[:8]}...{secret[-4:]}")
        assert attacker.delete(f"/v1/keys/{key_id}", headers=owner.session).status_code == 200
        fresh = attacker.post("/v1/keys", headers=owner.session, json={"name": "fresh window"})
        if fresh.status_code == 200:
            keys.append(fresh.json()["secret"])
        else:
            assert_openai_error(fresh, 400, "too_many_keys")
            refused_creations += 1
        if not keys:
            break
    # Every key's window was spent, and no sequence of revocations made room for another.
    assert admitted == tiers.FREE.keys_max * tiers.FREE.requests_per_minute
    assert refused_creations >= 1
