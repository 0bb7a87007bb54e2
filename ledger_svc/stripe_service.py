"""Billing's gRPC face and background work: card top-ups through Stripe, credited by Stripe's events.

Billing lives in ledger_svc because the ledger owns the money: a top-up is a
journal transfer, and crediting it in the same database transaction as the
top-up's own row is what makes "credited once" hold without a distributed
protocol. The flow:

  CreateTopup    validate the amount; make sure the card is the account's (a new
                 one is attached first: Stripe validates it then); create and
                 confirm a PaymentIntent (metadata: account and top-up ids). The
                 top-up is pending, or failed with the bank's message (and an email).
  Stripe's event payment_intent.succeeded, signature verified over the raw body:
                 credit transfer "stripe:<pi>" (the journal makes it happen once,
                 however often and however concurrently the event arrives) and mark
                 the top-up succeeded in the same transaction. The account's first
                 credited top-up also moves its keys to Paid (auth_svc's
                 SetAccountTier, only upgrading): tried before the credit is written,
                 so the Paid limit is in force by the time the money shows; if
                 auth_svc cannot be reached, the top-up row owes it and a worker
                 retries until it is done.
  payment_intent.payment_failed: the top-up fails, with the reason, and one email.

A reconciler asks Stripe about top-ups still pending after a few minutes, in
case an event was lost (localstripe never redelivers one).
"""
import asyncio
import functools
import logging
import uuid

import grpc

from common import clients, errors, logs, money
from ledger_svc import billing, config, domain, stripe_client, stripe_store, store as store_mod
from tokens.auth.v1 import auth_pb2, auth_pb2_grpc
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)

ACCOUNT_HEADER = "x-ts-account"
SIGNATURE_HEADER = "stripe-signature"
TIER_BATCH = 20
WORKER_POLL_S = 5.0
RECONCILE_EVERY_S = 30.0
RECONCILE_AFTER_MS = 120_000
RECONCILE_BATCH = 20
# A top-up whose PaymentIntent was never created (Stripe unreachable) is failed after this;
# one waiting for the customer's authentication, after a day.
UNCREATED_AFTER_MS = 15 * 60_000
ABANDONED_AFTER_MS = 86_400_000
DETAILS_MAX = 10
DETAIL_CHARS_MAX = 200

_ERRORS = {"INVALID_ARGUMENT": errors.InvalidRequest, "NOT_FOUND": errors.NotFound,
           "UNAVAILABLE": errors.Unavailable, "RESOURCE_EXHAUSTED": errors.RateLimited}


class Tiers:
    """auth_svc's AuthAdmin.SetAccountTier, as billing uses it: Paid, never lowering a key."""

    def __init__(self, stub: auth_pb2_grpc.AuthAdminStub, timeout_s: float) -> None:
        self._stub = stub
        self._timeout_s = timeout_s

    async def upgrade(self, account_id: str) -> bool:
        request = auth_pb2.SetAccountTierRequest(account_id=account_id, tier=billing.PAID_TIER, only_upgrade=True)
        try:
            await self._stub.SetAccountTier(request, timeout=self._timeout_s, wait_for_ready=True,
                                            metadata=clients.metadata(logs.request_id.get()))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                log.warning("no auth account to upgrade", extra={"account": account_id})
                return True
            log.warning("tier upgrade not done yet", extra={"account": account_id, "grpc": error.code().name})
            return False
        log.info("keys moved to paid after the first top-up", extra={"account": account_id})
        return True


class Billing:
    def __init__(self, settings: config.StripeSettings, store: stripe_store.BillingStore,
                 gateway: stripe_client.Gateway | None, tiers: Tiers | None, clock: domain.Clock,
                 closers: tuple = ()) -> None:
        self.settings = settings
        self.store = store
        self._gateway_or_none = gateway
        self._tiers = tiers
        self._clock = clock
        self.tier_ready = asyncio.Event()
        self._closers = closers

    @property
    def enabled(self) -> bool:
        return self._gateway_or_none is not None

    @property
    def gateway(self) -> stripe_client.Gateway | None:
        """Stripe, when configured (reconciliation reads its PaymentIntents)."""
        return self._gateway_or_none

    def _gateway(self) -> stripe_client.Gateway:
        if self._gateway_or_none is None:
            raise billing.Unavailable("Card payments are not configured on this server.", code="billing_disabled")
        return self._gateway_or_none

    async def close(self) -> None:
        for close in self._closers:
            await close()

    # --- customers and cards ---

    async def customer(self, account_id: str, *, create: bool) -> str | None:
        found = await self.store.customer_of(account_id)
        if found or not create:
            return found
        account = await self.store.journal.get_account(account_id)
        if account is None or account.kind != domain.CUSTOMER:
            raise billing.NotFound(f"no account {account_id!r}", code="account_not_found")
        created = await _stripe(self._gateway().create_customer(account_id, account.email))
        return await self.store.save_customer(account_id, created)

    async def cards(self, account_id: str) -> list[stripe_client.Card]:
        gateway = self._gateway()
        customer = await self.customer(account_id, create=False)
        return await _stripe(gateway.cards(customer)) if customer else []

    async def attach(self, account_id: str, payment_method: str) -> stripe_client.Card:
        payment_method = billing.payment_method_id(payment_method)
        customer = await self.customer(account_id, create=True)
        card = await self._own_card(payment_method, customer)
        if card.customer == customer:
            return card
        return await _stripe(self._gateway().attach(card.id, customer))

    async def detach(self, account_id: str, payment_method: str) -> stripe_client.Card:
        payment_method = billing.payment_method_id(payment_method)
        customer = await self.customer(account_id, create=False)
        card = await self._own_card(payment_method, customer or "")
        if not customer or card.customer != customer:
            raise billing.NotFound(f"no card {errors.echo(payment_method)!r} on this account", code="payment_method_not_found",
                                   param="payment_method_id")
        return await _stripe(self._gateway().detach(card.id))

    async def _own_card(self, payment_method: str, customer: str) -> stripe_client.Card:
        """The card, when it is this customer's or nobody's yet (fresh from Stripe.js). Use its
        id from here on: a test method such as pm_card_visa names a new card at every use."""
        card = await _stripe(self._gateway().card(payment_method), param="payment_method")
        if card.customer and card.customer != customer:
            raise billing.InvalidArgument("That payment method belongs to another customer.",
                                          code="invalid_payment_method", param="payment_method")
        return card

    async def setup_intent(self, account_id: str) -> stripe_client.Intent:
        customer = await self.customer(account_id, create=True)
        return await _stripe(self._gateway().setup_intent(customer))

    # --- top-ups ---

    async def create_topup(self, account_id: str, amount_usd: str, payment_method: str) -> billing.Topup:
        bounds = self.settings.topup_bounds
        amount_nanos = billing.topup_amount_nanos(amount_usd, bounds.day_max_nanos)
        payment_method = billing.payment_method_id(payment_method)
        gateway = self._gateway()
        # Over a bound, nothing reaches Stripe; the bound is decided again with the row's insert.
        await self.store.check_room(account_id, amount_nanos, bounds)
        customer = await self.customer(account_id, create=True)
        card = await self._own_card(payment_method, customer)
        topup = billing.Topup(id=f"topup_{uuid.uuid4().hex[:24]}", account_id=account_id, amount_nanos=amount_nanos,
                              currency=billing.CURRENCY, payment_method=card.id, status=billing.PENDING,
                              created_ms=self._clock(), card_brand=card.brand[:32], card_last4=card.last4[:4])
        await self.store.add_topup(topup, bounds)
        try:
            if card.customer != customer:
                await gateway.attach(card.id, customer)
            intent = await gateway.charge(customer, card.id, billing.cents(amount_nanos), billing.CURRENCY,
                                          {"account_id": account_id, "topup_id": topup.id},
                                          idempotency_key=f"topup-{topup.id}")
        except (stripe_client.CardDeclined, stripe_client.Rejected) as failure:
            log.info("top-up declined", extra={"topup": topup.id, "code": failure.code})
            await self.store.fail(topup.id, failure.message)
            return await self.store.topup(topup.id)
        except stripe_client.Unreachable as failure:
            log.warning("top-up outcome unknown", extra={"topup": topup.id, "error": failure.message})
            raise billing.Unavailable(
                f"Stripe did not answer ({failure.message}). Top-up {topup.id} is pending: it is credited if "
                "Stripe confirms the charge, and fails otherwise; see GET /v1/billing/topups.",
                code="stripe_unavailable") from None
        status = billing.status_of_intent(intent.status)
        if status == billing.FAILED:
            await self.store.fail(topup.id, "The payment was declined.", intent.id)
        else:
            await self.store.record_intent(topup.id, intent.id, status, intent.client_secret)
        return await self.store.topup(topup.id)

    async def topup(self, account_id: str, topup_id: str) -> billing.Topup:
        found = await self.store.topup(billing.topup_id(topup_id))
        if found is None or found.account_id != account_id:
            raise billing.NotFound(f"no top-up {errors.echo(topup_id)!r}", code="topup_not_found", param="topup_id")
        return found

    # --- Stripe's events ---

    async def handle_event(self, payload: bytes, signature: str) -> None:
        if not self.settings.webhook_secret:
            raise billing.Unavailable("Card payments are not configured on this server.", code="billing_disabled")
        try:
            event = stripe_client.verify_event(payload, signature, self.settings.webhook_secret,
                                               self.settings.webhook_tolerance_s)
        except stripe_client.BadSignature as bad:
            log.warning("webhook refused", extra={"error": str(bad)})
            raise billing.InvalidArgument("The Stripe-Signature header does not verify: " + str(bad),
                                          code="invalid_signature") from None
        payment = billing.payment_of(str(event.get("type")), (event.get("data") or {}).get("object"))
        if payment is None:
            return
        log.info("stripe event", extra={"event": event.get("id"), "type": payment.event_type,
                                        "payment_intent": payment.payment_intent_id})
        await self.apply(payment)

    async def apply(self, payment: billing.Payment) -> None:
        topup = await self._topup_of(payment)
        if topup is None:
            return
        if payment.event_type == billing.SUCCEEDED_EVENT:
            await self._credit(payment, topup)
        elif topup.status != billing.SUCCEEDED:
            await self.store.fail(topup.id, payment.failure_message, payment.payment_intent_id)

    async def _topup_of(self, payment: billing.Payment) -> billing.Topup | None:
        """The top-up an event is about, when the event and our records agree on whose it is."""
        account = await self.store.account_of_customer(payment.customer_id) if payment.customer_id else None
        topup = await self.store.topup_by_intent(payment.payment_intent_id)
        if topup is None and payment.topup_id.startswith("topup_"):
            candidate = await self.store.topup(payment.topup_id)
            if candidate is not None and candidate.payment_intent_id in (None, payment.payment_intent_id):
                topup = candidate
        if topup is not None:
            if account != topup.account_id:
                log.error("a Stripe event names another customer than its top-up's",
                          extra={"topup": topup.id, "payment_intent": payment.payment_intent_id})
                return None
            return topup
        if account and account == payment.account_id and payment.event_type == billing.SUCCEEDED_EVENT:
            # Charged outside this API (or the row was lost): still ours, and still credited once.
            return await self.store.topup(await self.store.adopt(payment, account))
        log.warning("a Stripe event for a payment billing does not know",
                    extra={"payment_intent": payment.payment_intent_id})
        return None

    async def _credit(self, payment: billing.Payment, topup: billing.Topup) -> None:
        if payment.currency != billing.CURRENCY or payment.amount_cents <= 0:
            log.error("a payment in another currency (or of nothing) is not credited",
                      extra={"payment_intent": payment.payment_intent_id, "currency": payment.currency})
            return
        tier = ""
        if topup.status != billing.SUCCEEDED and not await self.store.has_credited_topup(topup.account_id):
            tier = billing.TIER_DONE if await self._upgrade(topup.account_id) else billing.TIER_OWED
        result = await self.store.credit(payment, topup.id, topup.account_id, tier)
        if not result.ok:
            # The same PaymentIntent credited with other fields: an operator has to look.
            log.error("top-up credit refused by the journal", extra={"topup": topup.id, "result": result.value})
            return
        if tier == billing.TIER_OWED:
            self.tier_ready.set()
        log.info("top-up credited" if result is domain.TransferResult.CREATED else "top-up already credited",
                 extra={"topup": topup.id, "amount_usd": money.usd(payment.amount_nanos)})

    async def _upgrade(self, account_id: str) -> bool:
        return self._tiers is not None and await self._tiers.upgrade(account_id)

    # --- background: owed upgrades and top-ups whose event never came ---

    async def run_tier_jobs(self) -> int:
        jobs = await self.store.claim_tier_jobs(TIER_BATCH)
        for job in jobs:
            await self.store.finish_tier_job(job, await self._upgrade(job.account_id))
        return len(jobs)

    async def reconcile(self) -> int:
        now = self._clock()
        handled = 0
        for topup in await self.store.stale(now - RECONCILE_AFTER_MS, RECONCILE_BATCH):
            age_ms = now - topup.created_ms
            if topup.payment_intent_id and self.enabled:
                try:
                    intent = await self._gateway().intent(topup.payment_intent_id)
                except stripe_client.StripeFailure as failure:
                    log.warning("reconcile: Stripe did not answer", extra={"error": failure.message})
                    return handled
                status = str(intent.get("status") or "")
                if status == "succeeded":
                    await self.apply(billing.payment_of(billing.SUCCEEDED_EVENT, intent))
                elif status in ("requires_payment_method", "canceled") or age_ms > ABANDONED_AFTER_MS:
                    error = intent.get("last_payment_error") or {}
                    await self.store.fail(topup.id, error.get("message") or "The payment was not completed.")
                handled += 1
            elif not topup.payment_intent_id and age_ms > UNCREATED_AFTER_MS:
                await self.store.fail(topup.id, "Stripe never confirmed this charge; nothing was credited.")
                handled += 1
        return handled

    async def run(self) -> None:
        last_reconcile = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.run_tier_jobs()
                if loop.time() - last_reconcile >= RECONCILE_EVERY_S:
                    last_reconcile = loop.time()
                    await self.reconcile()
            except Exception as error:  # noqa: BLE001 - a passing database error must not end the worker
                log.warning("billing worker pass failed", extra={"error": repr(error)})
            self.tier_ready.clear()
            try:
                await asyncio.wait_for(self.tier_ready.wait(), WORKER_POLL_S)
            except TimeoutError:
                pass

    # --- emails other services send through the ledger ---

    async def queue_email(self, account_id: str, kind: str, dedupe_key: str, details: dict[str, str],
                          to: str = "") -> str:
        if kind not in billing.QUEUEABLE_EMAILS:
            raise billing.InvalidArgument(f"kind must be one of {', '.join(billing.QUEUEABLE_EMAILS)}",
                                          code="invalid_kind", param="kind")
        if not dedupe_key or len(dedupe_key) > 200:
            raise billing.InvalidArgument("dedupe_key must be 1 to 200 characters", code="invalid_dedupe_key",
                                          param="dedupe_key")
        if len(details) > DETAILS_MAX or any(len(k) > DETAIL_CHARS_MAX or len(v) > DETAIL_CHARS_MAX
                                             for k, v in details.items()):
            raise billing.InvalidArgument("details are too long", code="invalid_details", param="details")
        if (kind == billing.EMAIL_VERIFY) != bool(to) or len(to) > domain.EMAIL_LENGTH_MAX:
            raise billing.InvalidArgument("to is the address being verified: required for verify_email, and only "
                                          "for it", code="invalid_to", param="to")
        return await self.store.queue_email(account_id, kind, dedupe_key, details, to)


async def _stripe(call, param: str | None = None):
    """A Stripe call whose failure is the caller's answer (not a top-up's outcome)."""
    try:
        return await call
    except stripe_client.CardDeclined as failure:
        raise billing.InvalidArgument(failure.message, code=failure.code or "card_declined", param=param) from None
    except stripe_client.Rejected as failure:
        raise billing.InvalidArgument(failure.message, code=failure.code or "invalid_request", param=param) from None
    except stripe_client.Unreachable as failure:
        raise billing.Unavailable(f"Stripe is unavailable right now ({errors.echo(failure.message)}); try again shortly.",
                                  code="stripe_unavailable") from None


def build(settings: config.Settings, journal: store_mod.SqlStore, clock: domain.Clock) -> Billing:
    """Billing with its Stripe client and its channel to auth_svc (the caller closes it)."""
    stripe_settings = settings.stripe
    gateway = None
    if stripe_settings.enabled:
        gateway = stripe_client.Gateway(stripe_settings.api_key, stripe_settings.api_base, stripe_settings.timeout_s)
    channel = clients.channel(settings.auth_addr, settings.server.tls)
    tiers = Tiers(auth_pb2_grpc.AuthAdminStub(channel), settings.auth_timeout_s)
    closers = (channel.close,) + ((gateway.close,) if gateway is not None else ())
    return Billing(stripe_settings, stripe_store.BillingStore(journal, clock), gateway, tiers, clock, closers)


def disabled(journal: store_mod.SqlStore, clock: domain.Clock) -> Billing:
    """No Stripe and no auth_svc: only QueueEmail works (tests of the rest of the ledger)."""
    return Billing(config.StripeSettings(), stripe_store.BillingStore(journal, clock), None, None, clock)


# --- the gRPC face ------------------------------------------------------------------------

def _maps_billing_errors(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except billing.BillingError as error:
            retry_after_s = getattr(error, "retry_after_s", None)
            if retry_after_s is not None:
                await context.send_initial_metadata((("retry-after", str(retry_after_s)),))
            raise _ERRORS[error.grpc_code](error.message, code=error.code, param=error.param,
                                           retry_after_s=retry_after_s) from None
    return wrapper


def _account(context) -> str:
    account_id = next((v for k, v in context.invocation_metadata() or () if k == ACCOUNT_HEADER), "")
    if not account_id:
        raise errors.Unauthenticated("This call needs an API key or a session.")
    return account_id


def card_message(card: stripe_client.Card) -> ledger_pb2.PaymentMethod:
    return ledger_pb2.PaymentMethod(id=card.id, brand=card.brand, last4=card.last4, exp_month=card.exp_month,
                                    exp_year=card.exp_year, created=card.created_s)


def topup_message(topup: billing.Topup) -> ledger_pb2.Topup:
    return ledger_pb2.Topup(
        id=topup.id, amount_usd=money.usd(topup.amount_nanos), currency=topup.currency, status=topup.status,
        failure_message=topup.failure_message, payment_method=topup.payment_method, card_brand=topup.card_brand,
        card_last4=topup.card_last4, created=topup.created_ms // 1000, credited=topup.credited_ms // 1000,
        client_secret=topup.client_secret if topup.status == billing.REQUIRES_ACTION else "")


class BillingServicer(ledger_pb2_grpc.BillingServicer):
    def __init__(self, service: Billing) -> None:
        self._billing = service

    async def GetBillingConfig(self, request, context):
        _account(context)
        s = self._billing.settings
        return ledger_pb2.BillingConfig(
            enabled=self._billing.enabled, publishable_key=s.publishable_key if self._billing.enabled else "",
            stripe_js_url=s.js_url if self._billing.enabled else "", currency=billing.CURRENCY,
            topup_min_usd=billing.TOPUP_MIN_USD, topup_max_usd=money.usd(s.topup_daily_max_nanos))

    @_maps_billing_errors
    async def ListPaymentMethods(self, request, context):
        cards = await self._billing.cards(_account(context))
        return ledger_pb2.ListPaymentMethodsResponse(object="list", data=[card_message(c) for c in cards])

    @_maps_billing_errors
    async def AttachPaymentMethod(self, request, context):
        return card_message(await self._billing.attach(_account(context), request.payment_method))

    @_maps_billing_errors
    async def DetachPaymentMethod(self, request, context):
        return card_message(await self._billing.detach(_account(context), request.payment_method_id))

    @_maps_billing_errors
    async def CreateSetupIntent(self, request, context):
        intent = await self._billing.setup_intent(_account(context))
        return ledger_pb2.SetupIntent(id=intent.id, client_secret=intent.client_secret, status=intent.status)

    @_maps_billing_errors
    async def CreateTopup(self, request, context):
        return topup_message(await self._billing.create_topup(_account(context), request.amount_usd,
                                                              request.payment_method))

    @_maps_billing_errors
    async def ListTopups(self, request, context):
        account_id = _account(context)
        found = await self._billing.store.list_topups(account_id, billing.topups_limit(request.limit))
        return ledger_pb2.ListTopupsResponse(object="list", data=[topup_message(t) for t in found])

    @_maps_billing_errors
    async def GetTopup(self, request, context):
        return topup_message(await self._billing.topup(_account(context), request.topup_id))

    @_maps_billing_errors
    async def HandleStripeWebhook(self, request, context):
        signature = next((v for k, v in context.invocation_metadata() or () if k == SIGNATURE_HEADER), "")
        await self._billing.handle_event(request.data, signature)
        return ledger_pb2.StripeWebhookResponse(received=True)


async def queue_email(service: Billing, request: ledger_pb2.QueueEmailRequest) -> ledger_pb2.QueueEmailResponse:
    """Ledger.QueueEmail (server.py's LedgerService hands it over)."""
    try:
        status = await service.queue_email(request.account_id, request.kind, request.dedupe_key,
                                           dict(request.details), request.to)
    except billing.BillingError as error:
        raise _ERRORS[error.grpc_code](error.message, code=error.code, param=error.param) from None
    return ledger_pb2.QueueEmailResponse(status=status)
