"""Attacks on signups, addresses and logins, against the running mesh through Envoy, each
asserting the defended behaviour (issue 15: farming free credit, one inbox as many accounts,
mail to addresses nobody proved, guessing passwords)."""
import concurrent.futures
import uuid

from tests.abuse.accounts_rig import (  # noqa: F401  (fixtures)
    EMAIL_S_MAX, abuse_inbox, abuse_mesh, attacker, client_from, follow_link, new_address, no_new_accounts, operator,
    person)
from tests.e2e.conftest import PASSWORD, assert_openai_error, eventually

CHAT = {"model": "ref-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def new_email() -> str:
    return f"abuse-{uuid.uuid4().hex[:10]}@example.com"


def test_fifty_signups_from_one_address_farm_five_credits_and_no_more(attacker, abuse_mesh, operator):
    before = int(operator("stats")["accounts"])
    replies = [attacker.post("/v1/accounts", json={"email": new_email(), "password": PASSWORD},
                             headers={"x-forwarded-for": f"203.0.113.{n}"})  # a spoofed hop buys nothing
               for n in range(50)]
    assert [r.status_code for r in replies].count(200) == 5
    refused = [r for r in replies if r.status_code != 200]
    assert len(refused) == 45
    for reply in refused:
        error = assert_openai_error(reply, 429, "rate_limit_exceeded", "requests")
        assert "accounts created" in error["message"]
        assert 1 <= int(reply.headers["retry-after"]) <= 3600
    # No account and no credit for the refused ones: the ledger opened exactly five.
    assert int(operator("stats")["accounts"]) == before + 5
    # Another address is not held back by this one.
    with client_from(new_address(), abuse_mesh.config.base_url) as other:
        assert other.post("/v1/accounts", json={"email": new_email(), "password": PASSWORD}).status_code == 200


def test_one_inbox_is_one_account_whatever_its_case_or_tag(attacker, operator):
    local = f"alice{uuid.uuid4().hex[:6]}"
    first = attacker.post("/v1/accounts", json={"email": f"{local.upper()}@Example.com", "password": PASSWORD})
    assert first.status_code == 200, first.text
    with no_new_accounts(operator):
        for variant in (f"{local}@example.com", f"{local}+free@EXAMPLE.COM", f"{local.capitalize()}+2@example.com"):
            assert_openai_error(attacker.post("/v1/accounts", json={"email": variant, "password": PASSWORD}), 409,
                                "email_taken")
    # The address is kept as typed: the account logs in with it, or any case of it.
    session = attacker.post("/v1/sessions", json={"email": f"{local}@example.com", "password": PASSWORD})
    assert session.status_code == 200 and session.json()["account"]["id"] == first.json()["account"]["id"]


def test_an_unverified_address_gets_no_notice_and_its_key_spends_nothing(person, abuse_mesh, abuse_inbox, operator):
    someone = person(verified=False)
    assert eventually(lambda: abuse_inbox.links(someone.email), "the verification link", EMAIL_S_MAX)
    base = abuse_mesh.config.base_url
    with client_from(new_address(), base) as client:
        account = client.get("/v1/account", headers=someone.auth).json()  # reading the account is fine
        assert account["email_verified"] is False and account["balance_usd"] == "10.00"
        refused = client.post("/v1/chat/completions", headers=someone.auth, json=CHAT)
        error = assert_openai_error(refused, 403, "email_not_verified", "invalid_request_error")
        assert error["param"] is None and "/v1/email-verifications/resend" in error["message"]
        assert client.get("/v1/models", headers=someone.auth).status_code == 200
        # The balance crosses $5 while the address is unverified: the ledger has no address to mail.
        operator("credit", someone.account_id, "-6", "--reason", "abuse test: below the low-balance line")
        assert client.get("/v1/account", headers=someone.auth).json()["balance_usd"] == "4.00"
        follow_link(client, abuse_inbox, someone.email)
        assert client.get("/v1/account", headers=someone.auth).json()["email_verified"] is True
        # Verified, the next crossing is mailed; the one before never was.
        operator("credit", someone.account_id, "-4", "--reason", "abuse test: to zero")
        notices = eventually(lambda: abuse_inbox.to(someone.email), "the $0 notice", EMAIL_S_MAX)
        assert [m["Subject"] for m in notices] == ["Your token-service credit has run out"]
        assert client.post("/v1/chat/completions", headers=someone.auth, json=CHAT).status_code == 402


def test_forty_wrong_passwords_are_throttled_and_then_the_right_one_is_refused_too(attacker, person):
    victim = person()
    statuses = [attacker.post("/v1/sessions", json={"email": victim.email, "password": f"guess number {n}"})
                for n in range(40)]
    assert [r.status_code for r in statuses] == [401] * 10 + [429] * 30
    for reply in statuses[10:]:
        assert_openai_error(reply, 429, "rate_limit_exceeded")
        assert 1 <= int(reply.headers["retry-after"]) <= 900
    right = attacker.post("/v1/sessions", json={"email": victim.email.upper(), "password": PASSWORD})
    error = assert_openai_error(right, 429, "rate_limit_exceeded")
    assert "right password is refused too" in error["message"] and "set-cookie" not in right.headers
    # The victim's keys still work: a lockout of logins is not a lockout of the API.
    assert attacker.get("/v1/account", headers=victim.auth).status_code == 200


def test_parallel_wrong_passwords_get_no_more_guesses_than_the_limit(attacker, person):
    victim = person()
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        replies = list(pool.map(lambda n: attacker.post("/v1/sessions", json={
            "email": victim.email, "password": f"parallel guess {n}"}), range(30)))
    statuses = [r.status_code for r in replies]
    # Each guess is counted before its password is checked: at most 10 were checked at all.
    assert statuses.count(401) <= 10 and statuses.count(401) + statuses.count(429) + statuses.count(503) == 30
    assert 200 not in statuses


def test_wrong_passwords_over_many_emails_are_limited_per_address(attacker):
    statuses = [attacker.post("/v1/sessions", json={"email": new_email(), "password": "a guessed password"})
                .status_code for _ in range(35)]
    assert statuses == [401] * 30 + [429] * 5


def test_verification_resends_are_throttled_per_account(person, abuse_mesh, abuse_inbox):
    someone = person(verified=False)
    with client_from(new_address(), abuse_mesh.config.base_url) as client:
        sent = [client.post("/v1/email-verifications/resend", headers=someone.session, json={}) for _ in range(6)]
    assert [r.status_code for r in sent] == [200] * 3 + [429] * 3
    assert_openai_error(sent[-1], 429, "rate_limit_exceeded")
    # The signup's link and three more, nothing else: the rest cost no mail.
    assert eventually(lambda: len(abuse_inbox.links(someone.email)) == 4 or None, "four links", EMAIL_S_MAX)
