"""Attacks on money and on dashboard sessions, against the running mesh through Envoy and
localstripe (issue 15: $10,000 top-ups three times in a second, 100 SetupIntents in 0.3 s)."""
import concurrent.futures

from ledger_svc import billing
from ratelimit_svc import limits
from tests.abuse.accounts_rig import (  # noqa: F401  (fixtures)
    EMAIL_S_MAX, abuse_inbox, abuse_mesh, attacker, operator, person)
from tests.e2e.conftest import assert_openai_error, eventually


def card_of(attacker, session) -> str:
    card = attacker.post("/v1/billing/payment-methods", headers=session, json={"payment_method": "pm_card_visa"})
    assert card.status_code == 200, card.text
    return card.json()["id"]


def test_top_ups_stop_at_the_daily_maximum_however_they_are_sent(attacker, person):
    owner = person()
    card = card_of(attacker, owner.session)
    huge = attacker.post("/v1/billing/topups", headers=owner.session, json={"amount_usd": "10000.00",
                                                                           "payment_method": card})
    assert_openai_error(huge, 400, "amount_too_large")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: attacker.post("/v1/billing/topups", headers=owner.session, json={
            "amount_usd": "400.00", "payment_method": card}), range(6)))
    accepted = [r for r in replies if r.status_code == 200]
    assert len(accepted) == 2  # $800 of $1,000: a third would pass the day's maximum
    for reply in replies:
        if reply.status_code != 200:
            error = assert_openai_error(reply, 400, "daily_topup_limit")
            assert "contact support" in error["message"]
    # What was accepted is credited, and nothing more: $10 + 2 x $400.
    eventually(lambda: attacker.get("/v1/account", headers=owner.session).json()["balance_usd"] == "810.00",
               "the two top-ups credited", EMAIL_S_MAX)
    over = attacker.post("/v1/billing/topups", headers=owner.session, json={"amount_usd": "200.01",
                                                                           "payment_method": card})
    assert_openai_error(over, 400, "daily_topup_limit")


def test_top_up_attempts_are_bounded_per_hour(attacker, person):
    owner = person()
    declined = attacker.post("/v1/billing/payment-methods", headers=owner.session,
                             json={"payment_method": "pm_card_visa_chargeDeclined"})
    card = declined.json()["id"] if declined.status_code == 200 else "pm_card_visa_chargeDeclined"
    replies = [attacker.post("/v1/billing/topups", headers=owner.session, json={"amount_usd": "5.00",
                                                                               "payment_method": card})
               for _ in range(billing.TOPUP_ATTEMPTS_PER_HOUR + 3)]
    tried = replies[:billing.TOPUP_ATTEMPTS_PER_HOUR]
    assert all(r.status_code in (200, 400) for r in tried), [r.text for r in tried]
    for reply in replies[billing.TOPUP_ATTEMPTS_PER_HOUR:]:
        assert_openai_error(reply, 429, "too_many_topup_attempts")
        assert 1 <= int(reply.headers["retry-after"]) <= 3600
    assert attacker.get("/v1/account", headers=owner.session).json()["balance_usd"] == "10.00"


def test_a_flood_of_dashboard_session_calls_is_limited(attacker, person):
    owner = person()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: attacker.get("/v1/account", headers=owner.session), range(150)))
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == limits.SESSION_CALLS_PER_ACCOUNT.limit and statuses.count(429) == 30
    for reply in replies:
        if reply.status_code == 429:
            assert_openai_error(reply, 429, "rate_limit_exceeded", "requests")
            assert 1 <= int(reply.headers["retry-after"]) <= 60
    # The account's API key is limited by its own window, not by its owner's dashboard.
    assert attacker.get("/v1/models", headers=owner.auth).status_code == 200


def test_card_setups_are_bounded_per_account(attacker, person):
    owner = person()
    replies = [attacker.post("/v1/billing/setup-intents", headers=owner.session, json={}) for _ in range(30)]
    statuses = [r.status_code for r in replies]
    assert statuses == [200] * limits.CARD_SETUPS_PER_ACCOUNT.limit + [429] * 10
    assert "card set-ups" in replies[-1].json()["error"]["message"]


def test_an_unverified_account_cannot_add_cards_or_top_up(attacker, person):
    someone = person(verified=False)
    for reply in (attacker.post("/v1/billing/setup-intents", headers=someone.session, json={}),
                  attacker.post("/v1/billing/payment-methods", headers=someone.session,
                                json={"payment_method": "pm_card_visa"}),
                  attacker.post("/v1/billing/topups", headers=someone.session,
                                json={"amount_usd": "5.00", "payment_method": "pm_card_visa"})):
        assert_openai_error(reply, 403, "email_not_verified")
