"""Billing in ledger_svc, built with build_server on port 0 against SQLite (and PostgreSQL when its
URL is given), talking to a real localstripe (`python -m ledger_svc.stripe_local`, its own state
file) and to a fake auth_svc AuthAdmin (a real gRPC server that can be down). Stripe's signed
events are caught on their way and handed to the Billing service by the test, as Envoy would.
"""
import asyncio
import dataclasses
import email
import json
import os
import subprocess
import sys
import time

import grpc
import httpx
import pytest
import sqlalchemy as sa
from google.api import httpbody_pb2

from common import config as common_config, db, migrate
from ledger_svc import billing, config, emails, server, store as store_mod, stripe_service, testing
from tests import stripe_events
from tests.conftest import free_port
from tokens.auth.v1 import auth_pb2, auth_pb2_grpc
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

pytestmark = pytest.mark.timeout(120)

USD = 1_000_000_000
SECRET = "whsec_integration_" + "x" * 16
EVENT_S_MAX = 10.0


# localstripe, once per module, and the events it sends

@dataclasses.dataclass
class LocalStripe:
    url: str
    catcher: stripe_events.Catcher

    def events(self) -> list[tuple[bytes, str]]:
        return self.catcher.events()

    async def event(self, event_type: str, payment_intent: str) -> tuple[bytes, str]:
        deadline = time.monotonic() + EVENT_S_MAX
        while time.monotonic() < deadline:
            for body, signature in self.events():
                event = json.loads(body)
                if event["type"] == event_type and event["data"]["object"]["id"] == payment_intent:
                    return body, signature
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {event_type} for {payment_intent}")

    def intents_of(self, topup_id: str) -> list[dict]:
        reply = httpx.get(f"{self.url}/v1/payment_intents", params={"limit": 100}, timeout=10,
                          headers={"Authorization": "Bearer sk_test_integration"})
        return [pi for pi in reply.json()["data"] if pi["metadata"].get("topup_id") == topup_id]


@pytest.fixture(scope="module")
def localstripe(tmp_path_factory):
    catcher = stripe_events.Catcher()
    port = free_port()
    state = tmp_path_factory.mktemp("localstripe") / "state.pickle"
    proc = subprocess.Popen([sys.executable, "-m", "ledger_svc.stripe_local", "--port", str(port),
                             "--state", str(state),
                             "--webhook-url", catcher.url],
                            env=dict(os.environ, TOKENS_STRIPE_WEBHOOK_SECRET=SECRET), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/js.stripe.com/v3/", timeout=1)
            break
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, "localstripe did not start"
            time.sleep(0.1)
    yield LocalStripe(url, catcher)
    proc.terminate()
    proc.wait(10)
    catcher.close()
    assert state.exists(), "localstripe kept no state of its own"


# A fake auth_svc

class FakeAuthAdmin(auth_pb2_grpc.AuthAdminServicer):
    def __init__(self) -> None:
        self.calls: list[auth_pb2.SetAccountTierRequest] = []
        self.down = False

    async def SetAccountTier(self, request, context):
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "auth is down")
        self.calls.append(request)
        return auth_pb2.SetAccountTierResponse()


@dataclasses.dataclass
class Running:
    ledger: ledger_pb2_grpc.LedgerStub
    billing: ledger_pb2_grpc.BillingStub
    service: stripe_service.Billing
    store: store_mod.SqlStore
    auth: FakeAuthAdmin
    clock: testing.FakeClock
    stripe: LocalStripe

    def md(self, account_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-ts-account", account_id), ("x-ts-auth", "session"))

    async def account(self, account_id: str, email_addr: str = "") -> None:
        await self.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id=account_id,
                                                                    email=email_addr or f"{account_id}@x.test"))

    async def balance(self, account_id: str) -> str:
        return (await self.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id=account_id))).balance_usd

    async def attach(self, account_id: str, payment_method: str) -> ledger_pb2.PaymentMethod:
        return await self.billing.AttachPaymentMethod(
            ledger_pb2.AttachPaymentMethodRequest(payment_method=payment_method), metadata=self.md(account_id))

    async def top_up(self, account_id: str, amount: str, payment_method: str = "pm_card_visa") -> ledger_pb2.Topup:
        return await self.billing.CreateTopup(ledger_pb2.CreateTopupRequest(amount_usd=amount,
                                                                           payment_method=payment_method),
                                              metadata=self.md(account_id))

    async def deliver(self, body: bytes, signature: str | None):
        metadata = (("stripe-signature", signature),) if signature is not None else ()
        return await self.billing.HandleStripeWebhook(
            httpbody_pb2.HttpBody(content_type="application/json; charset=utf-8", data=body), metadata=metadata)

    async def event_for(self, topup_id: str, event_type: str = billing.SUCCEEDED_EVENT) -> tuple[bytes, str]:
        intents = self.stripe.intents_of(topup_id)
        assert len(intents) == 1, intents
        return await self.stripe.event(event_type, intents[0]["id"])

    async def emails(self, kind: str) -> list[dict]:
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(sa.select(store_mod.email_outbox).where(store_mod.email_outbox.c.kind == kind))
            return [dict(row._mapping) for row in rows]


@pytest.fixture
async def running(db_target, tmp_path, localstripe):
    await migrate.upgrade("ledger_svc", db_target.url, db_target.schema)
    auth = FakeAuthAdmin()
    auth_server = grpc.aio.server()
    auth_pb2_grpc.add_AuthAdminServicer_to_server(auth, auth_server)
    auth_port = auth_server.add_insecure_port("127.0.0.1:0")
    await auth_server.start()
    settings = config.Settings(
        server=common_config.ServerSettings(host="127.0.0.1", port=0, log_level="INFO", drain_s=0.0, grace_s=1.0),
        database_url=db_target.url, database_schema=db_target.schema, catalog_path=testing.write_catalog(tmp_path),
        signup_credit_nanos=10 * USD, low_balance_nanos=5 * USD, public_base_url=config.PUBLIC_BASE_URL_DEFAULT,
        hold_ttl_s=900, smtp_url="", email_from="billing@test", emails_dir=tmp_path / "emails", lago_api_url="",
        lago_api_key="", lago_event_code="api_call", batch_max=1000, batch_linger_ms=0.0, batch_workers=1,
        price_refresh_s=2.0, auth_addr=f"127.0.0.1:{auth_port}", auth_timeout_s=1.0,
        stripe=config.StripeSettings(api_key="sk_test_integration", publishable_key="pk_test_integration",
                                     webhook_secret=SECRET, api_base=localstripe.url,
                                     js_url=f"{localstripe.url}/js.stripe.com/v3/", timeout_s=5.0))
    engine = db.make_engine(settings.database_url, schema=settings.database_schema)
    clock = testing.FakeClock(int(time.time() * 1000))
    store = server.make_store(settings, engine, clock)
    service = stripe_service.build(settings, store, clock)
    grpc_server, port, _health = server.build_server(settings, store, clock, billing=service)
    await grpc_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Running(ledger_pb2_grpc.LedgerStub(channel), ledger_pb2_grpc.BillingStub(channel), service, store, auth,
                  clock, localstripe)
    await channel.close()
    await grpc_server.stop(None)
    await service.close()
    await store.close()
    await engine.dispose()
    await auth_server.stop(None)


def error_of(caught) -> dict:
    return json.loads(caught.value.details())["error"]


async def test_a_top_up_is_credited_once_by_its_event_and_moves_the_keys_to_paid(running):
    await running.account("acct_a")
    card = await running.attach("acct_a", "pm_card_visa")
    assert card.id.startswith("pm_") and card.last4 == "4242" and card.brand == "visa"
    listed = await running.billing.ListPaymentMethods(ledger_pb2.ListPaymentMethodsRequest(),
                                                      metadata=running.md("acct_a"))
    assert [c.id for c in listed.data] == [card.id]

    topup = await running.top_up("acct_a", "5.00", card.id)
    assert (topup.status, topup.amount_usd, topup.card_last4, topup.credited) == ("pending", "5.00", "4242", 0)
    body, signature = await running.event_for(topup.id)
    assert await running.balance("acct_a") == "10.00"  # nothing until the event

    answers = await asyncio.gather(*(running.deliver(body, signature) for _ in range(5)))
    assert all(a.received for a in answers)
    assert await running.balance("acct_a") == "15.00"
    assert await running.balance("acct_a") == "15.00"
    got = await running.billing.GetTopup(ledger_pb2.GetTopupRequest(topup_id=topup.id), metadata=running.md("acct_a"))
    assert got.status == "succeeded" and got.credited > 0
    transfers = await running.store.transfers_of("acct_a")
    payments = [t for t in transfers if t.kind == "payment"]
    assert len(payments) == 1 and payments[0].amount_nanos == 5 * USD and payments[0].id.startswith("stripe:pi_")
    # The first credited top-up upgraded the keys, before the credit was written (each concurrent
    # delivery may ask: the call only ever raises a key, so asking again changes nothing).
    upgrades = {(c.account_id, c.tier, c.only_upgrade) for c in running.auth.calls}
    assert upgrades == {("acct_a", "paid", True)}
    asked = len(running.auth.calls)

    running.clock.advance(1000)
    second = await running.top_up("acct_a", "12.34", card.id)
    await running.deliver(*await running.event_for(second.id))
    assert await running.balance("acct_a") == "27.34"
    assert len(running.auth.calls) == asked  # only the first top-up owes the upgrade
    history = await running.billing.ListTopups(ledger_pb2.ListTopupsRequest(), metadata=running.md("acct_a"))
    assert [t.id for t in history.data] == [second.id, topup.id]


async def test_an_upgrade_auth_could_not_take_is_retried_until_done(running):
    await running.account("acct_b")
    running.auth.down = True
    topup = await running.top_up("acct_b", "5.00")
    await running.deliver(*await running.event_for(topup.id))
    assert await running.balance("acct_b") == "15.00"  # the money never waits for auth_svc
    assert await running.service.run_tier_jobs() == 1  # due at once: still down
    assert running.auth.calls == []
    running.auth.down = False
    assert await running.service.run_tier_jobs() == 0  # backing off
    running.clock.advance(5_000)
    assert await running.service.run_tier_jobs() == 1
    assert [(c.account_id, c.tier) for c in running.auth.calls] == [("acct_b", "paid")]
    running.clock.advance(600_000)
    assert await running.service.run_tier_jobs() == 0


@pytest.mark.parametrize("payment_method", ["pm_card_chargeCustomerFail", "pm_card_visa_chargeDeclined"])
async def test_a_declined_card_fails_the_top_up_credits_nothing_and_emails_once(running, payment_method):
    await running.account("acct_c", "c@x.test")
    topup = await running.top_up("acct_c", "20.00", payment_method)
    assert topup.status == "failed" and topup.failure_message == "Your card was declined.", topup
    if payment_method == "pm_card_chargeCustomerFail":
        # Stripe's payment_failed event comes too, and changes nothing.
        await running.deliver(*await running.event_for(topup.id, billing.FAILED_EVENT))
    mails = await running.emails(billing.EMAIL_TOPUP_FAILED)
    assert len(mails) == 1 and mails[0]["to_addr"] == "c@x.test", mails
    message = emails.render({**mails[0], "id": mails[0]["id"]},
                            emails.Branding("billing@test", "https://tokens.flex.ai", 5 * USD))
    assert message["Subject"] == "Your $20.00 top-up did not go through"
    assert "Your card was declined." in message.get_content() and "$10.00" in message.get_content()
    assert await running.balance("acct_c") == "10.00"
    assert running.auth.calls == []


@pytest.mark.parametrize("amount, code", [("4.99", "amount_too_small"), ("5.005", "invalid_amount"),
                                          ("1e3", "invalid_amount"), ("10000.01", "amount_too_large"),
                                          ("", "invalid_amount")])
async def test_amounts_outside_the_bounds_are_refused(running, amount, code):
    await running.account("acct_d")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.top_up("acct_d", amount)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(caught)["code"] == code and error_of(caught)["param"] == "amount_usd"
    listed = await running.billing.ListTopups(ledger_pb2.ListTopupsRequest(), metadata=running.md("acct_d"))
    assert list(listed.data) == []


async def test_a_bad_or_stale_signature_is_refused_and_credits_nothing(running):
    await running.account("acct_e")
    topup = await running.top_up("acct_e", "5.00")
    body, signature = await running.event_for(topup.id)
    old = int(time.time()) - running.service.settings.webhook_tolerance_s - 10
    stale_signature = stripe_events.sign(body, SECRET, old)
    for payload, header in ((body, None), (body, "t=1,v1=00"), (body.replace(b"500", b"900"), signature),
                            (body, stale_signature)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.deliver(payload, header)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, header
        assert error_of(caught)["code"] == "invalid_signature"
    assert await running.balance("acct_e") == "10.00"
    await running.deliver(body, signature)
    assert await running.balance("acct_e") == "15.00"


async def test_a_lost_event_is_made_up_for_by_the_reconciler(running):
    await running.account("acct_f")
    topup = await running.top_up("acct_f", "6.00")
    await running.event_for(topup.id)  # sent, but never handed over: lost
    assert await running.service.reconcile() == 0  # too recent to ask Stripe about
    running.clock.advance(stripe_service.RECONCILE_AFTER_MS + 1000)
    assert await running.service.reconcile() == 1
    assert await running.balance("acct_f") == "16.00"
    assert await running.service.reconcile() == 0


async def test_a_card_of_another_customer_is_refused(running):
    await running.account("acct_g")
    await running.account("acct_h")
    card = await running.attach("acct_g", "pm_card_visa")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.top_up("acct_h", "5.00", card.id)
    assert error_of(caught)["code"] == "invalid_payment_method"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.billing.GetTopup(ledger_pb2.GetTopupRequest(topup_id="topup_nope"), metadata=running.md("acct_h"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.billing.ListTopups(ledger_pb2.ListTopupsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_queue_email_sends_an_upgrade_notice_once_per_key(running):
    await running.account("acct_i", "i@x.test")
    request = ledger_pb2.QueueEmailRequest(account_id="acct_i", kind="tier_changed", dedupe_key="upgrade:upg_1",
                                           details={"tier": "elevated"})
    assert (await running.ledger.QueueEmail(request)).status == "queued"
    assert (await running.ledger.QueueEmail(request)).status == "duplicate"
    mails = await running.emails("tier_changed")
    assert len(mails) == 1
    message = emails.render(mails[0], emails.Branding("billing@test", "https://tokens.flex.ai", 5 * USD))
    assert message["To"] == "i@x.test" and message["Subject"] == "Your API keys are now on the Elevated tier"
    assert "60 requests per minute" in message.get_content()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.ledger.QueueEmail(ledger_pb2.QueueEmailRequest(account_id="acct_i", kind="low",
                                                                     dedupe_key="x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.ledger.QueueEmail(ledger_pb2.QueueEmailRequest(account_id="acct_nobody", kind="tier_changed",
                                                                     dedupe_key="y"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_without_stripe_billing_says_so(tmp_path):
    from tests.integration.test_ledger_server import make_settings

    settings = make_settings(tmp_path)
    await migrate.upgrade("ledger_svc", settings.database_url)
    engine = db.make_engine(settings.database_url)
    store = server.make_store(settings, engine, testing.FakeClock())
    grpc_server, port, _health = server.build_server(settings, store, testing.FakeClock())
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.BillingStub(channel)
            md = (("x-ts-account", "acct_z"),)
            config_reply = await stub.GetBillingConfig(ledger_pb2.GetBillingConfigRequest(), metadata=md)
            assert not config_reply.enabled and config_reply.topup_min_usd == "5.00"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateTopup(ledger_pb2.CreateTopupRequest(amount_usd="5.00", payment_method="pm_x"),
                                       metadata=md)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_of(caught)["code"] == "billing_disabled"
    finally:
        await grpc_server.stop(None)
        await store.close()
        await engine.dispose()


def test_emails_render_as_mail():
    fields = {"kind": "topup_failed", "to_addr": "a@x.test", "created_ms": 0, "id": 7, "balance_nanos": 3 * USD,
              "details": json.dumps({"amount_usd": "5.00", "message": "Insufficient funds.",
                                     "card": "visa ending in 0341"})}
    message = emails.render(fields, emails.Branding("billing@test", "https://tokens.flex.ai", 5 * USD))
    parsed = email.message_from_bytes(bytes(message))
    assert parsed["Subject"] == "Your $5.00 top-up did not go through"
    assert "visa ending in 0341" in message.get_content() and "Insufficient funds." in message.get_content()
