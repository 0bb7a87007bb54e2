"""Card top-ups end to end: the real Envoy, every service, localstripe (the offline Stripe that
`./dev up` runs) sending its signed events to the public webhook route, and a real SMTP server.

What the public page promises: a top-up of any amount >= $5 is credited once, when Stripe
confirms it; a declined card credits nothing and says why (in the API and by email); the
first top-up moves the account's keys to Paid (300 a minute) on the next call. And what
makes "once" true: the same signed event delivered five times at once credits once, and a
forged, tampered or stale signature credits nothing.
"""
import concurrent.futures
import contextlib
import json
import time

import httpx
import pytest

from common import money
from devtool import up
from ledger_svc import billing
from tests.stripe_events import Catcher, sign
from tests.e2e.conftest import PASSWORD, Customer, assert_openai_error, eventually, mesh_mailing_to, signup

WEBHOOK_PATH = "/v1/billing/stripe/webhook"
# localstripe sends an event about a second after the payment.
CREDIT_S_MAX = 15.0
EMAIL_S_MAX = 15.0
QUIET_S = 2.5
CHAT = {"model": "ref-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
DECLINED = "Your card was declined."


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, inbox):
    with mesh_mailing_to(tmp_path_factory.mktemp("topups-mesh"), inbox) as instance:
        yield instance


@pytest.fixture
def dashboard(base_url):
    """dashboard(customer) -> the customer's Dashboard (closed after the test)."""
    opened = []

    def open_one(customer: Customer) -> "Dashboard":
        opened.append(Dashboard(base_url, customer))
        return opened[-1]

    yield open_one
    for dash in opened:
        dash.http.close()


# Helpers

class Dashboard:
    """The customer's session (its calls do not count toward the key's rate limit)."""

    def __init__(self, base_url: str, customer: Customer) -> None:
        reply = httpx.post(f"{base_url}/v1/sessions", json={"email": customer.email, "password": PASSWORD},
                           timeout=30)
        assert reply.status_code == 200, reply.text
        self.http = httpx.Client(base_url=base_url, timeout=30,
                                 headers={"Authorization": f"Bearer {reply.json()['session_token']}"})

    def get(self, path: str, **params) -> dict:
        reply = self.http.get(path, params=params)
        assert reply.status_code == 200, (path, reply.status_code, reply.text)
        return reply.json()

    def balance(self) -> str:
        return self.get("/v1/account")["balance_usd"]

    def add_card(self, payment_method: str) -> dict:
        reply = self.http.post("/v1/billing/payment-methods", json={"payment_method": payment_method})
        assert reply.status_code == 200, reply.text
        return reply.json()

    def top_up(self, amount_usd: str, payment_method: str) -> httpx.Response:
        return self.http.post("/v1/billing/topups", json={"amount_usd": amount_usd, "payment_method": payment_method})

    def topup(self, topup_id: str) -> dict:
        return self.get(f"/v1/billing/topups/{topup_id}")

    def settled(self, topup_id: str) -> dict:
        return eventually(lambda: (t := self.topup(topup_id))["status"] in ("succeeded", "failed") and t,
                          f"top-up {topup_id} settles", CREDIT_S_MAX)


def limit_now(base_url: str, customer: Customer) -> str:
    return call(base_url, customer).headers["x-ratelimit-limit-requests"]


def call(base_url: str, customer: Customer) -> httpx.Response:
    reply = httpx.post(f"{base_url}/v1/chat/completions", headers=customer.auth, json=CHAT, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply


def deliver(base_url: str, payload: bytes, signature: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return httpx.post(f"{base_url}{WEBHOOK_PATH}", content=payload, headers=headers, timeout=30)


@contextlib.contextmanager
def events_held_back(mesh: up.Mesh):
    """localstripe's events go to a local catcher instead of the gateway while inside: the
    test delivers them itself (as Stripe would: the same bytes, the same signature)."""
    catcher = Catcher()
    config = mesh.config

    def point_to(url: str) -> None:
        reply = httpx.post(f"{config.localstripe_url}/_config/webhooks/token-service", timeout=10,
                           json={"url": url, "secret": config.stripe_webhook_secret, "events": list(billing.EVENTS)})
        assert reply.status_code == 200, reply.text

    point_to(catcher.url)
    try:
        yield catcher
    finally:
        point_to(f"{config.base_url}{WEBHOOK_PATH}")
        catcher.close()


def held_event(catcher: Catcher, event_type: str, payment_intent: str) -> tuple[bytes, str]:
    def find():
        for body, signature in catcher.events():
            event = json.loads(body)
            if event["type"] == event_type and event["data"]["object"]["id"] == payment_intent:
                return body, signature
        return None
    return eventually(find, f"{event_type} for {payment_intent}", CREDIT_S_MAX)


def payment_intent_of(mesh: up.Mesh, topup_id: str) -> str:
    """The top-up's PaymentIntent, asked of localstripe (the API does not show it)."""
    reply = httpx.get(f"{mesh.config.localstripe_url}/v1/payment_intents", timeout=10,
                      headers={"Authorization": "Bearer sk_test_localstripe"}, params={"limit": 100})
    found = [pi["id"] for pi in reply.json()["data"] if pi["metadata"].get("topup_id") == topup_id]
    assert len(found) == 1, found
    return found[0]


# Tests

def test_billing_config_names_the_key_and_stripe_js(dashboard, mesh, base_url, customer):
    config = dashboard(customer).get("/v1/billing/config")
    assert config["enabled"] is True and config["publishable_key"].startswith("pk_"), config
    assert config["stripe_js_url"] == f"{mesh.config.localstripe_url}/js.stripe.com/v3/", config
    assert (config["topup_min_usd"], config["currency"]) == ("5.00", "usd"), config
    stripe_js = httpx.get(config["stripe_js_url"], timeout=10)
    assert stripe_js.status_code == 200 and "Stripe" in stripe_js.text


def test_a_five_dollar_top_up_credits_exactly_five_dollars_once_and_the_keys_become_paid(
        dashboard, base_url, customer, inbox):
    dash = dashboard(customer)
    assert dash.balance() == "10.00"
    card = dash.add_card("pm_card_visa")
    assert card["id"].startswith("pm_") and card["last4"] == "4242", card
    assert [c["id"] for c in dash.get("/v1/billing/payment-methods")["data"]] == [card["id"]]
    first = call(base_url, customer)
    assert first.headers["x-ratelimit-limit-requests"] == "10"
    # That call's charge lands in the background: wait for it, so the top-up is all that moves next.
    before = money.usd(10 * money.NANOS_PER_USD - money.parse_usd(first.json()["usage"]["cost"]))
    eventually(lambda: dash.balance() == before, "the call's charge", CREDIT_S_MAX)

    reply = dash.top_up("5.00", card["id"])
    assert reply.status_code == 200, reply.text
    topup = reply.json()
    assert topup["status"] == "pending" and topup["amount_usd"] == "5.00", topup
    assert (topup["card_brand"], topup["card_last4"]) == ("visa", "4242"), topup
    done = dash.settled(topup["id"])
    assert done["status"] == "succeeded" and done["failure_message"] == "" and done["credited"] > 0, done

    assert money.parse_usd(dash.balance()) - money.parse_usd(before) == 5 * money.NANOS_PER_USD
    time.sleep(QUIET_S)  # nothing more is credited, by a late or repeated event
    assert money.parse_usd(dash.balance()) - money.parse_usd(before) == 5 * money.NANOS_PER_USD
    assert [t["id"] for t in dash.get("/v1/billing/topups")["data"]] == [topup["id"]]
    # The next call already has the Paid limit, with the same key.
    assert limit_now(base_url, customer) == "300"
    assert dash.get("/v1/account")["tier"] == "paid"
    keys = dash.get("/v1/keys")["data"]
    assert {k["tier"] for k in keys} == {"paid"}, keys
    assert inbox.to(customer.email) == []


@pytest.mark.parametrize("amount", ["4.99", "0", "-5", "5.001", "five", "", "10000.01", "100000000"])
def test_a_top_up_under_five_dollars_or_malformed_or_absurd_is_refused(dashboard, customer, amount):
    dash = dashboard(customer)
    card = dash.add_card("pm_card_visa")
    reply = dash.top_up(amount, card["id"])
    error = assert_openai_error(reply, 400, error_type="invalid_request_error")
    assert error["param"] == "amount_usd", error
    if amount == "4.99":
        assert error["code"] == "amount_too_small" and "$5.00" in error["message"], error
    assert dash.get("/v1/billing/topups")["data"] == []
    assert dash.balance() == "10.00"


def test_a_top_up_with_a_card_that_is_not_a_card_is_refused(dashboard, customer):
    dash = dashboard(customer)
    assert_openai_error(dash.top_up("5.00", "4242424242424242"), 400, code="invalid_payment_method")
    assert_openai_error(dash.top_up("5.00", "pm_doesNotExist"), 400)
    assert dash.get("/v1/billing/topups")["data"] == []


@pytest.mark.parametrize("payment_method", ["pm_card_chargeCustomerFail", "pm_card_visa_chargeDeclined"])
def test_a_declined_card_credits_nothing_and_the_customer_is_told_why(
        dashboard, base_url, customer, inbox, payment_method):
    dash = dashboard(customer)
    reply = dash.top_up("25.00", payment_method)
    assert reply.status_code == 200, reply.text
    topup = reply.json()
    assert topup["status"] == "failed" and topup["failure_message"] == DECLINED, topup
    assert topup["credited"] == 0

    mails = eventually(lambda: inbox.to(customer.email), "the email saying why", EMAIL_S_MAX)
    assert mails[0]["Subject"] == "Your $25.00 top-up did not go through", mails[0]["Subject"]
    assert DECLINED in mails[0].get_content() and "/dashboard/billing" in mails[0].get_content()
    time.sleep(QUIET_S)  # Stripe's payment_failed event has come and gone: no second email, no credit
    assert len(inbox.to(customer.email)) == 1
    listed = dash.get("/v1/billing/topups")["data"]
    assert [(t["id"], t["status"], t["failure_message"]) for t in listed] == [(topup["id"], "failed", DECLINED)]
    assert dash.balance() == "10.00"
    assert limit_now(base_url, customer) == "10"


def test_the_same_event_delivered_five_times_at_once_credits_once(dashboard, mesh, base_url, customer):
    dash = dashboard(customer)
    card = dash.add_card("pm_card_visa")
    with events_held_back(mesh) as events:
        topup = dash.top_up("7.50", card["id"]).json()
        assert topup["status"] == "pending", topup
        body, signature = held_event(events, "payment_intent.succeeded", payment_intent_of(mesh, topup["id"]))
    # Stripe has taken the money; nothing is credited until its event arrives.
    assert dash.balance() == "10.00" and dash.topup(topup["id"])["status"] == "pending"

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda _: deliver(base_url, body, signature), range(5)))
    assert [r.status_code for r in replies] == [200] * 5, [r.text for r in replies]
    assert all(r.json() == {"received": True} for r in replies)
    assert dash.balance() == "17.50"
    assert dash.topup(topup["id"])["status"] == "succeeded"
    # And again, later (Stripe retries until it hears 2xx): still once.
    assert deliver(base_url, body, signature).status_code == 200
    time.sleep(QUIET_S)
    assert dash.balance() == "17.50"


def test_a_forged_tampered_or_stale_signature_credits_nothing(dashboard, mesh, base_url, customer):
    dash = dashboard(customer)
    card = dash.add_card("pm_card_visa")
    secret = mesh.config.stripe_webhook_secret
    with events_held_back(mesh) as events:
        topup = dash.top_up("5.00", card["id"]).json()
        body, signature = held_event(events, "payment_intent.succeeded", payment_intent_of(mesh, topup["id"]))

    event = json.loads(body)
    event["data"]["object"]["amount"] = 500_000
    tampered = json.dumps(event).encode()
    forgeries = [
        (body, None),                                            # no signature
        (body, sign(body, "whsec_" + "0" * 32)),                 # signed with another secret
        (tampered, signature),                                   # the amount changed under Stripe's signature
        (tampered, sign(tampered, "whsec_guess")),
        (body, sign(body, secret, int(time.time()) - 3600)),     # Stripe's own secret, an hour old: a replay
        (b"not json", sign(b"not json", secret)),
    ]
    for payload, header in forgeries:
        error = assert_openai_error(deliver(base_url, payload, header), 400)
        assert error["code"] in ("invalid_signature", None), error
    time.sleep(QUIET_S)
    assert dash.balance() == "10.00"
    assert dash.topup(topup["id"])["status"] == "pending"
    # The genuine event, delivered now, is what credits it.
    assert deliver(base_url, body, signature).status_code == 200
    assert dash.balance() == "15.00" and dash.topup(topup["id"])["status"] == "succeeded"


def test_an_approved_upgrade_applies_on_the_next_call_and_emails_the_customer(
        dashboard, base_url, customer, operator, inbox):
    dash = dashboard(customer)
    assert limit_now(base_url, customer) == "10"
    reply = dash.http.post("/v1/upgrade-requests", json={"tier": "elevated", "reason": "evaluating for a team"})
    assert reply.status_code == 200, reply.text
    request = reply.json()
    assert request["status"] == "pending"
    assert request["id"] in [r["id"] for r in operator("upgrades")["data"]]
    assert operator("upgrades", "approve", request["id"])["status"] == "approved"

    assert limit_now(base_url, customer) == "60"
    assert dash.get("/v1/account")["tier"] == "elevated"
    mail = eventually(lambda: inbox.to(customer.email), "the approval email", EMAIL_S_MAX)[0]
    assert mail["Subject"] == "Your API keys are now on the Elevated tier", mail["Subject"]
    assert "60 requests per minute" in mail.get_content()
    # Asking again once there is refused, and a top-up later still moves the keys up to Paid.
    again = dash.http.post("/v1/upgrade-requests", json={"tier": "elevated"})
    assert_openai_error(again, 400, code="already_upgraded")
    card = dash.add_card("pm_card_visa")
    topup = dash.top_up("5.00", card["id"]).json()
    assert dash.settled(topup["id"])["status"] == "succeeded"
    assert limit_now(base_url, customer) == "300"


def test_top_ups_are_private_to_their_account(dashboard, base_url, customer):
    dash = dashboard(customer)
    card = dash.add_card("pm_card_visa")
    topup = dash.top_up("5.00", card["id"]).json()
    other = dashboard(signup(base_url))
    assert_openai_error(other.http.get(f"/v1/billing/topups/{topup['id']}"), 404)
    assert other.get("/v1/billing/topups")["data"] == []
    # Someone else's saved card cannot be used or attached.
    assert_openai_error(other.top_up("5.00", card["id"]), 400, code="invalid_payment_method")
    assert_openai_error(other.http.post("/v1/billing/payment-methods", json={"payment_method": card["id"]}), 400)
    assert httpx.get(f"{base_url}/v1/billing/topups", timeout=10).status_code == 401
