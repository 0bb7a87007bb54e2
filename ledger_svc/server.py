"""ledger_svc's gRPC face: the Ledger (internal) and Usage (public) services and Envoy's Check.

Translates protobuf <-> domain and domain errors -> common.errors (one place:
_maps_domain_errors); main() is the composition root.
"""
import asyncio
import base64
import binascii
import functools
import json
import logging
import time

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.api import httpbody_pb2
from grpc_health.v1 import health

from common import catalog, db, errors, grpcserver, logs, migrate, money, pricing
from ledger_svc import check, config, domain, emails, metrics, reconcile, store as store_mod, stripe_service
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = ("tokens.ledger.v1.Ledger", "tokens.ledger.v1.Usage", "tokens.ledger.v1.Billing",
                 "envoy.service.auth.v3.Authorization")
ACCOUNT_HEADER = "x-ts-account"


class FailedPrecondition(errors.ApiError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400
    type = "invalid_request_error"


_ERRORS = {
    "INVALID_ARGUMENT": errors.InvalidRequest,
    "NOT_FOUND": errors.NotFound,
    "ALREADY_EXISTS": errors.Conflict,
    "FAILED_PRECONDITION": FailedPrecondition,
}


def _maps_domain_errors(method):
    """The one place domain errors become API errors (common.grpcserver turns those into statuses)."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except domain.LedgerError as error:
            raise _ERRORS[error.grpc_code](error.message, code=error.code, param=error.param) from None
    return wrapper


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def balance_message(account: domain.Account) -> ledger_pb2.Balance:
    return ledger_pb2.Balance(
        account_id=account.id, balance_nanos=account.balance_nanos, held_nanos=account.held_nanos,
        available_nanos=account.available_nanos, balance_usd=money.usd(account.balance_nanos),
        held_usd=money.usd(account.held_nanos), available_usd=money.usd(account.available_nanos))


def units_message(units: domain.Units) -> ledger_pb2.Units:
    return ledger_pb2.Units(**units.as_usage())


def units_of(message: ledger_pb2.Units) -> domain.Units:
    return domain.Units(message.input_tokens, message.output_tokens, message.images, message.video_ms,
                        message.characters, message.audio_ms)


def price_message(version: domain.PriceVersion) -> ledger_pb2.ModelPrice:
    return ledger_pb2.ModelPrice(model=version.model, effective_from=version.effective_from_s,
                                 version=version.version,
                                 pricing={unit: money.usd(nanos) for unit, nanos in version.prices.items()})


class LedgerService(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, store: store_mod.Store, models: catalog.Catalog, clock: domain.Clock,
                 billing: stripe_service.Billing, reconcile_policy: reconcile.Policy) -> None:
        self._store = store
        self._catalog = models
        self._clock = clock
        self._billing = billing
        self._reconcile_policy = reconcile_policy
        # A reconciliation reads the whole journal: one at a time is plenty, and bounds what an
        # operator's loop can cost the replica.
        self._reconciling = asyncio.Lock()

    @_maps_domain_errors
    async def OpenAccount(self, request, context):
        return balance_message(await self._store.open_account(request.account_id, request.email))

    async def GetBalance(self, request, context):
        account = await self._store.get_account(request.account_id)
        if account is None or account.kind != domain.CUSTOMER:
            raise errors.NotFound(f"no account {request.account_id!r}", code="account_not_found")
        return balance_message(account)

    async def Credit(self, request, context):
        result, account = await self._store.credit(request.account_id, request.amount_nanos,
                                                   request.transfer_id, request.reason, request.kind)
        if not result.ok:
            raise _transfer_rejection(result)
        status = "created" if result is domain.TransferResult.CREATED else "duplicate"
        return ledger_pb2.CreditResponse(transfer_id=request.transfer_id, status=status,
                                         balance=balance_message(account))

    async def Settle(self, request, context):
        if len(request.settlements) > domain.SETTLEMENTS_MAX:
            raise errors.InvalidRequest(f"at most {domain.SETTLEMENTS_MAX} settlements per call",
                                        code="too_many_settlements", param="settlements")
        settlements = [domain.Settlement(hold_id=s.hold_id, units=units_of(s.units), outcome=s.outcome,
                                         request_id=s.request_id, ended_ms=s.ended_ms)
                       for s in request.settlements]
        try:
            results = await self._store.settle(settlements)
        except Exception as error:  # noqa: BLE001 - router_svc retries from its outbox
            metrics.DATABASE_ERRORS.inc()
            log.warning("settle failed", extra={"error": repr(error)})
            raise errors.Unavailable("the ledger cannot settle right now; retry") from None
        for result in results:
            metrics.settled(result.status.value).inc()
            if result.capped:
                # router_svc cuts every call at its hold first: this is a router that did not.
                metrics.SETTLEMENTS_CAPPED.inc()
                log.warning("a settlement cost more than its hold; charged the hold at most",
                            extra={"hold": result.hold_id, "cost_nanos": result.cost_nanos})
        return ledger_pb2.SettleResponse(results=[
            ledger_pb2.SettleResult(hold_id=r.hold_id, status=r.status.value, cost_nanos=r.cost_nanos)
            for r in results])

    async def ClaimHolds(self, request, context):
        if len(request.hold_ids) > domain.SETTLEMENTS_MAX:
            raise errors.InvalidRequest(f"at most {domain.SETTLEMENTS_MAX} hold ids per call",
                                        code="too_many_holds", param="hold_ids")
        if any(not hold_id or len(hold_id) > domain.HOLD_ID_LENGTH_MAX for hold_id in request.hold_ids):
            raise errors.InvalidRequest(f"every hold id must be 1..{domain.HOLD_ID_LENGTH_MAX} characters",
                                        code="invalid_hold_id", param="hold_ids")
        try:
            claimed = await self._store.claim_holds(request.hold_ids)
            metrics.HOLDS_CLAIMED.inc(claimed)
        except Exception as error:  # noqa: BLE001 - router_svc claims again
            metrics.DATABASE_ERRORS.inc()
            log.warning("claiming holds failed", extra={"error": repr(error)})
            raise errors.Unavailable("the ledger cannot claim holds right now; retry") from None
        return ledger_pb2.ClaimHoldsResponse(claimed=claimed)

    async def GetPrices(self, request, context):
        book = self._store.price_book
        now_s = self._clock() // 1000
        wanted = list(request.models) or book.models()
        found = [book.current(model, now_s) for model in wanted]
        return ledger_pb2.GetPricesResponse(prices=[price_message(v) for v in found if v is not None])

    @_maps_domain_errors
    async def SetPrice(self, request, context):
        model = self._catalog.get(request.model)
        if model is None:
            raise check.UnknownModel(f"The model `{request.model}` does not exist.", param="model")
        try:
            unit_prices = pricing.parse_prices(dict(request.pricing))
        except ValueError as error:
            raise errors.InvalidRequest(str(error), code="invalid_pricing", param="pricing") from None
        now_s = self._clock() // 1000
        effective = request.effective_from or now_s
        domain.check_price(model.id, unit_prices, effective, now_s, catalog.TYPE_UNITS[model.type])
        return price_message(await self._store.set_price(model.id, unit_prices, effective))

    async def GetJournalStats(self, request, context):
        stats = await self._store.journal_stats()
        return ledger_pb2.GetJournalStatsResponse(
            accounts=stats.accounts, transfers=stats.transfers, pending_holds=stats.pending_holds,
            sum_of_balances_nanos=stats.sum_of_balances_nanos, outbox_emails=stats.outbox_emails,
            outbox_lago=stats.outbox_lago)

    async def QueueEmail(self, request, context):
        return await stripe_service.queue_email(self._billing, request)

    async def Reconcile(self, request, context):
        if request.since_ms < 0:
            raise errors.InvalidRequest("since_ms must be Unix milliseconds (0: everything)", code="invalid_since",
                                        param="since_ms")
        drifts_max = request.drifts_max or reconcile.DRIFTS_MAX_DEFAULT
        if not 0 < drifts_max <= reconcile.DRIFTS_MAX:
            raise errors.InvalidRequest(f"drifts_max must be between 1 and {reconcile.DRIFTS_MAX}",
                                        code="invalid_drifts_max", param="drifts_max")
        if self._reconciling.locked():
            raise errors.RateLimited("A reconciliation is already running on this replica; try again once it ends.",
                                     code="reconcile_running")
        async with self._reconciling:
            reconciler = reconcile.Reconciler(self._store, self._billing.gateway, self._clock, self._reconcile_policy)
            async for item in reconciler.run(request.since_ms, drifts_max):
                if isinstance(item, reconcile.Summary):
                    log.info("reconciled", extra={"kind": item.kind, "status": item.status, "drifts": item.drifts})
                yield reconcile_event(item)


def reconcile_event(item: reconcile.Drift | reconcile.Summary) -> ledger_pb2.ReconcileEvent:
    if isinstance(item, reconcile.Drift):
        return ledger_pb2.ReconcileEvent(drift=ledger_pb2.ReconcileDrift(kind=item.kind, check=item.check,
                                                                         row=item.row, detail=item.detail))
    figures = [ledger_pb2.ReconcileFigure(
        name=f.name, count=f.count or 0, has_count=f.count is not None, amount_nanos=f.amount_nanos or 0,
        amount_usd=money.usd(f.amount_nanos) if f.amount_nanos is not None else "") for f in item.figures]
    return ledger_pb2.ReconcileEvent(summary=ledger_pb2.ReconcileSummary(
        kind=item.kind, status=item.status, figures=figures, drifts=item.drifts, note=item.note))


def _transfer_rejection(result: domain.TransferResult) -> errors.ApiError:
    if result in (domain.TransferResult.DEBIT_ACCOUNT_NOT_FOUND, domain.TransferResult.CREDIT_ACCOUNT_NOT_FOUND):
        kind = errors.NotFound
    elif result.name.startswith("EXISTS_WITH_DIFFERENT_"):
        kind = errors.Conflict
    else:
        kind = errors.InvalidRequest
    return kind(f"transfer refused: {result.value}", code=result.value)


def encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"u{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | None:
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text[:1] == "u" and text[1:].isdigit():
            return int(text[1:])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise errors.InvalidRequest("after is not a cursor this API returned", code="invalid_cursor", param="after")


class UsageService(ledger_pb2_grpc.UsageServicer):
    def __init__(self, store: store_mod.Store, clock: domain.Clock) -> None:
        self._store = store
        self._clock = clock

    async def _page(self, request, context) -> store_mod.UsagePage:
        account_id = next((v for k, v in context.invocation_metadata() or () if k == ACCOUNT_HEADER), "")
        if not account_id:
            raise errors.Unauthenticated("This call needs an API key or a session.")
        query = domain.usage_query(account_id, request.start, request.end, request.limit,
                                   decode_cursor(request.after), request.key_id, request.model, self._clock())
        return await self._store.list_usage(query)

    @_maps_domain_errors
    async def ListUsageHttp(self, request, context):
        page = await self._page(request, context)
        body = {
            "object": "list",
            "data": [{"request_id": row.request_id, "created": row.created_ms // 1000, "key_id": row.key_id,
                      "model": row.model, "units": row.units.as_usage(), "cost_usd": money.usd(row.cost_nanos),
                      "outcome": row.outcome} for _, row in page.rows],
            "daily": [{"date": day, "model": model, "requests": requests, "units": units.as_usage(),
                       "cost_usd": money.usd(cost)} for day, model, requests, units, cost in page.daily],
            "next_after": encode_cursor(page.rows[-1][0]) if page.has_more else "",
            "has_more": page.has_more,
            "total_cost_usd": money.usd(sum(cost for *_, cost in page.daily)),
        }
        return httpbody_pb2.HttpBody(content_type="application/json",
                                     data=json.dumps(body, separators=(",", ":")).encode())

    @_maps_domain_errors
    async def ListUsage(self, request, context):
        page = await self._page(request, context)
        data = [ledger_pb2.UsageRecord(request_id=row.request_id, created=row.created_ms // 1000, key_id=row.key_id,
                                       model=row.model, units=units_message(row.units),
                                       cost_usd=money.usd(row.cost_nanos), outcome=row.outcome)
                for _, row in page.rows]
        daily = [ledger_pb2.UsageDay(date=day, model=model, requests=requests, units=units_message(units),
                                     cost_usd=money.usd(cost))
                 for day, model, requests, units, cost in page.daily]
        return ledger_pb2.ListUsageResponse(
            object="list", data=data, daily=daily, has_more=page.has_more,
            next_after=encode_cursor(page.rows[-1][0]) if page.has_more else "",
            total_cost_usd=money.usd(sum(cost for *_, cost in page.daily)))


def build_server(settings: config.Settings, store: store_mod.Store, clock: domain.Clock, *,
                 billing: stripe_service.Billing | None = None,
                 ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """`billing` (stripe_service.build) serves top-ups; None: Billing answers 503 (not configured)."""
    models = catalog.load(settings.catalog_path)
    billing = billing or stripe_service.disabled(store, clock)
    server, health_servicer = grpcserver.create(SERVICE_NAMES, max_receive_bytes=check.CHECK_BYTES_MAX)
    ledger_pb2_grpc.add_LedgerServicer_to_server(
        LedgerService(store, models, clock, billing, reconcile_policy(settings)), server)
    ledger_pb2_grpc.add_UsageServicer_to_server(UsageService(store, clock), server)
    ledger_pb2_grpc.add_BillingServicer_to_server(stripe_service.BillingServicer(billing), server)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        check.Authorization(store, models, clock, settings.public_base_url), server)
    port = grpcserver.bind(server, settings.server.host, settings.server.port, settings.server.tls)
    return server, port, health_servicer


def make_store(settings: config.Settings, engine, clock: domain.Clock) -> store_mod.SqlStore:
    return store_mod.SqlStore(
        engine, clock, signup_credit_nanos=settings.signup_credit_nanos,
        low_balance_nanos=settings.low_balance_nanos, hold_ttl_s=settings.hold_ttl_s,
        hold_claim_s=settings.hold_claim_s, export_lago=bool(settings.lago_api_url), batch_max=settings.batch_max,
        batch_linger_ms=settings.batch_linger_ms, batch_workers=settings.batch_workers)


async def seed_prices(settings: config.Settings, store: store_mod.SqlStore) -> None:
    models = catalog.load(settings.catalog_path)
    added = await store.seed_prices({model.id: model.prices_nanos() for model in models.models.values()})
    for version in added:
        log.info("price version added from the catalog", extra={"model": version.model, "version": version.version})


EXPIRY_BATCH = 500
# Delivered emails and exported events stay this long (for operators), then go.
OUTBOX_RETENTION_MS = 7 * 86_400_000
# How late past its expiry the sweep may void a hold (beyond its interval), and a
# succeeded PaymentIntent be credited (beyond billing's own reconciler), before
# reconciliation calls it a drift.
SWEEP_MARGIN_MS = 10_000
CREDIT_MARGIN_MS = 60_000


def expiry_every_s(settings: config.Settings) -> float:
    """A lapsed hold stops holding credit within a quarter of the shorter lifetime (5 s at most)."""
    return min(5.0, settings.hold_ttl_s / 4, settings.hold_claim_s / 4)


def reconcile_policy(settings: config.Settings) -> reconcile.Policy:
    return reconcile.Policy(
        sweep_slack_ms=int(expiry_every_s(settings) * 1000) + SWEEP_MARGIN_MS,
        credit_slack_ms=stripe_service.RECONCILE_AFTER_MS + int(stripe_service.RECONCILE_EVERY_S * 1000)
        + CREDIT_MARGIN_MS,
        lago_on=bool(settings.lago_api_url), lago_window_ms=OUTBOX_RETENTION_MS)


async def _every(interval_s: float, work, name: str) -> None:
    while True:
        try:
            await work()
        except Exception as error:  # noqa: BLE001 - a passing database error must not end the loop
            log.warning(f"{name} failed", extra={"error": repr(error)})
        await asyncio.sleep(interval_s)


def start_background(settings: config.Settings, store: store_mod.SqlStore, clock: domain.Clock, *,
                     billing: stripe_service.Billing | None = None) -> list[asyncio.Task]:
    """Hold expiry, price refresh, the email sender, outbox pruning, (when configured) the
    Lago exporter, and billing's worker (owed tier upgrades, top-ups whose event never came)."""

    async def expire() -> None:
        while True:
            expired = await store.expire_due(EXPIRY_BATCH)
            metrics.HOLDS_EXPIRED.inc(expired)
            if expired < EXPIRY_BATCH:
                return

    async def prune() -> None:
        for outbox in store_mod.OUTBOXES:
            await store.prune(outbox, clock() - OUTBOX_RETENTION_MS)

    brand = emails.Branding(settings.email_from, settings.public_base_url, settings.low_balance_nanos)
    sender = emails.Sender(store, emails.transport_for(settings.smtp_url, settings.emails_dir), brand, clock)
    tasks = [
        asyncio.create_task(_every(expiry_every_s(settings), expire, "hold expiry"), name="ledger-expiry"),
        asyncio.create_task(_every(settings.price_refresh_s, store.refresh_prices, "price refresh"),
                            name="ledger-prices"),
        asyncio.create_task(sender.run(), name="ledger-emails"),
        asyncio.create_task(_every(600.0, prune, "outbox pruning"), name="ledger-prune"),
    ]
    if settings.lago_api_url:
        # Imported only when configured: lago-python-client takes half a second to import.
        from ledger_svc import lago_client

        exporter = lago_client.Exporter(store, lago_client.LagoSettings(
            settings.lago_api_url, settings.lago_api_key, settings.lago_event_code), clock)
        tasks.append(asyncio.create_task(exporter.run(), name="ledger-lago"))
    if billing is not None:
        tasks.append(asyncio.create_task(billing.run(), name="ledger-billing"))
    return tasks


async def stop_background(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def main(settings: config.Settings) -> None:
    logs.setup("ledger_svc", settings.server.log_level)
    engine = db.make_engine(settings.database_url, schema=settings.database_schema)
    await migrate.check("ledger_svc", engine)
    store = make_store(settings, engine, wall_clock_ms)
    await seed_prices(settings, store)
    billing = stripe_service.build(settings, store, wall_clock_ms)
    server, port, health_servicer = build_server(settings, store, wall_clock_ms, billing=billing)
    tasks = start_background(settings, store, wall_clock_ms, billing=billing)
    log.info("ledger_svc listening", extra={"host": settings.server.host, "port": port,
                                            "billing": "stripe" if billing.enabled else "off"})

    async def on_stop() -> None:
        await stop_background(tasks)
        await billing.close()
        await store.close()
        await engine.dispose()

    await grpcserver.run_until_signal(server, health_servicer, SERVICE_NAMES, settings.server,
                                      on_stop=on_stop)
