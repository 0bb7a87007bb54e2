"""Billing's SQL: Stripe customers, top-ups, the owed tier upgrades, and billing's emails.

The tables are defined with the journal's (ledger_svc.store), so one migration
history covers both. The credit of a top-up goes through SqlStore.credit, whose
`also` hook records the top-up as succeeded in the same transaction as the
journal transfer: a top-up is marked credited exactly when its money is.
"""
import dataclasses
import json
import uuid
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from common import money
from ledger_svc import billing, domain, store as store_mod

customers = store_mod.billing_customers
topups = store_mod.billing_topups
accounts = store_mod.accounts
email_outbox = store_mod.email_outbox

TIER_LEASE_MS = 60_000
TIER_BACKOFF_MS_MAX = 300_000


@dataclasses.dataclass(frozen=True)
class TierJob:
    topup_id: str
    account_id: str
    attempts: int


class BillingStore:
    def __init__(self, journal: store_mod.SqlStore, clock: domain.Clock) -> None:
        self.journal = journal
        self._engine = journal.engine
        self._clock = clock

    # --- customers ---

    async def customer_of(self, account_id: str) -> str | None:
        async with self._engine.connect() as conn:
            return (await conn.execute(sa.select(customers.c.customer_id)
                                       .where(customers.c.account_id == account_id))).scalar()

    async def save_customer(self, account_id: str, customer_id: str) -> str:
        """Records the account's Stripe customer; when another call recorded one first, that one
        wins (and is returned)."""
        try:
            async with self._engine.begin() as conn:
                await conn.execute(customers.insert().values(account_id=account_id, customer_id=customer_id,
                                                             created_ms=self._clock()))
            return customer_id
        except sa_exc.IntegrityError:
            existing = await self.customer_of(account_id)
            if existing is None:
                raise
            return existing

    async def account_of_customer(self, customer_id: str) -> str | None:
        async with self._engine.connect() as conn:
            return (await conn.execute(sa.select(customers.c.account_id)
                                       .where(customers.c.customer_id == customer_id))).scalar()

    # --- top-ups ---

    async def check_room(self, account_id: str, amount_nanos: int, bounds: billing.TopupBounds) -> None:
        """billing.check_room on the account's recent top-ups (a look before calling Stripe)."""
        async with self._engine.connect() as conn:
            await self._room(conn, account_id, amount_nanos, bounds)

    async def _room(self, conn: AsyncConnection, account_id: str, amount_nanos: int,
                    bounds: billing.TopupBounds) -> None:
        now = self._clock()
        day_total = (await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(topups.c.amount_nanos), 0)).where(
            topups.c.account_id == account_id, topups.c.created_ms > now - billing.DAY_MS,
            topups.c.status != billing.FAILED))).scalar_one()
        attempts = (await conn.execute(sa.select(topups.c.created_ms).where(
            topups.c.account_id == account_id, topups.c.created_ms > now - billing.HOUR_MS))).scalars().all()
        billing.check_room(bounds, amount_nanos, int(day_total), list(attempts), now)

    async def add_topup(self, topup: billing.Topup, bounds: billing.TopupBounds | None = None) -> None:
        """Records a top-up; with `bounds`, only if the account is within them, decided under a
        lock of its ledger account so that parallel top-ups take turns."""
        async with self._engine.begin() as conn:
            if bounds is not None:
                await conn.execute(sa.select(accounts.c.id).where(accounts.c.id == topup.account_id)
                                   .with_for_update())
                await self._room(conn, topup.account_id, topup.amount_nanos, bounds)
            await conn.execute(topups.insert().values(
                id=topup.id, account_id=topup.account_id, amount_nanos=topup.amount_nanos, currency=topup.currency,
                payment_method=topup.payment_method, card_brand=topup.card_brand, card_last4=topup.card_last4,
                status=topup.status, created_ms=topup.created_ms))

    async def topup(self, topup_id: str) -> billing.Topup | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(topups).where(topups.c.id == topup_id))).first()
        return _topup(row) if row is not None else None

    async def topup_by_intent(self, payment_intent_id: str) -> billing.Topup | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(topups).where(topups.c.payment_intent_id == payment_intent_id))
                   ).first()
        return _topup(row) if row is not None else None

    async def list_topups(self, account_id: str, limit: int) -> list[billing.Topup]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(topups).where(topups.c.account_id == account_id)
                                       .order_by(topups.c.created_ms.desc(), topups.c.id.desc()).limit(limit))).all()
        return [_topup(row) for row in rows]

    async def has_credited_topup(self, account_id: str) -> bool:
        async with self._engine.connect() as conn:
            found = (await conn.execute(sa.select(topups.c.id).where(
                topups.c.account_id == account_id, topups.c.status == billing.SUCCEEDED).limit(1))).first()
        return found is not None

    async def record_intent(self, topup_id: str, intent_id: str, status: str, client_secret: str) -> None:
        """What creating the PaymentIntent answered. Never overrides what Stripe's event already
        decided (succeeded or failed): the event may arrive before this answer does."""
        values = {"payment_intent_id": intent_id, "client_secret": client_secret if status == billing.REQUIRES_ACTION
                  else ""}
        if status in (billing.PENDING, billing.REQUIRES_ACTION):
            values["status"] = status
        async with self._engine.begin() as conn:
            await conn.execute(topups.update().where(
                topups.c.id == topup_id, topups.c.status.in_((billing.PENDING, billing.REQUIRES_ACTION)))
                .values(**values))

    async def fail(self, topup_id: str, message: str, intent_id: str | None = None) -> bool:
        """Marks a top-up failed and queues the email that says why, once; a top-up that was
        credited stays credited. Returns whether this call failed it."""
        async with self._engine.begin() as conn:
            row = (await conn.execute(sa.select(topups).where(topups.c.id == topup_id))).first()
            if row is None or row.status in (billing.SUCCEEDED, billing.FAILED):
                return False
            values = {"status": billing.FAILED, "failure_message": billing.failure_message(message),
                      "client_secret": ""}
            if intent_id and not row.payment_intent_id:
                values["payment_intent_id"] = intent_id
            done = await conn.execute(topups.update().where(topups.c.id == topup_id,
                                                            topups.c.status == row.status).values(**values))
            if done.rowcount != 1:
                return False
            details = {"amount_usd": money.usd(row.amount_nanos), "message": values["failure_message"],
                       "card": f"{row.card_brand} ending in {row.card_last4}".strip() if row.card_last4 else ""}
            await _queue(conn, row.account_id, billing.EMAIL_TOPUP_FAILED, f"topup_failed:{topup_id}", details,
                         self._clock())
        self.journal.emails_ready.set()
        return True

    async def credit(self, payment: billing.Payment, topup_id: str, account_id: str,
                     tier: str) -> domain.TransferResult:
        """Credits the PaymentIntent's amount to the account, once ever, and marks the top-up
        succeeded in the same transaction. `tier` is the state of the upgrade the account's
        first credited top-up owes ("", pending or done)."""

        async def also(conn: AsyncConnection, result: domain.TransferResult) -> None:
            now = self._clock()
            values = {"status": billing.SUCCEEDED, "credited_ms": now, "failure_message": "", "client_secret": "",
                      "payment_intent_id": payment.payment_intent_id}
            if tier:
                values.update(tier_status=tier, tier_next_attempt_ms=now)
            await conn.execute(topups.update().where(topups.c.id == topup_id,
                                                     topups.c.status != billing.SUCCEEDED).values(**values))

        result, _account = await self.journal.credit(
            account_id, payment.amount_nanos, billing.transfer_id(payment.payment_intent_id),
            f"Stripe top-up {payment.payment_intent_id}", domain.PAYMENT, also=also)
        return result

    async def adopt(self, payment: billing.Payment, account_id: str) -> str:
        """A PaymentIntent of ours whose top-up row is missing (created outside this API, or the
        row lost): a row for it, so history shows what was credited. Returns its id."""
        topup_id = payment.topup_id or f"topup_{uuid.uuid4().hex[:24]}"
        try:
            await self.add_topup(billing.Topup(id=topup_id, account_id=account_id, amount_nanos=payment.amount_nanos,
                                               currency=payment.currency, payment_method="",
                                               status=billing.PENDING, created_ms=self._clock()))
        except sa_exc.IntegrityError:
            pass
        return topup_id

    async def stale(self, older_than_ms: int, limit: int) -> list[billing.Topup]:
        """Top-ups still waiting for Stripe's word (their event may have been lost)."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(topups).where(
                topups.c.status.in_((billing.PENDING, billing.REQUIRES_ACTION)),
                topups.c.created_ms < older_than_ms).order_by(topups.c.created_ms).limit(limit))).all()
        return [_topup(row) for row in rows]

    # --- the owed tier upgrades (an outbox in the top-up rows) ---

    async def claim_tier_jobs(self, limit: int) -> list[TierJob]:
        now = self._clock()
        async with self._engine.begin() as conn:
            rows = (await conn.execute(sa.select(topups.c.id, topups.c.account_id, topups.c.tier_attempts).where(
                topups.c.tier_status == billing.TIER_OWED, topups.c.tier_next_attempt_ms <= now)
                .order_by(topups.c.tier_next_attempt_ms).limit(limit))).all()
            claimed = []
            for row in rows:
                # Evaluated again under the row lock: two replicas never both take a job.
                done = await conn.execute(topups.update().where(
                    topups.c.id == row.id, topups.c.tier_status == billing.TIER_OWED,
                    topups.c.tier_next_attempt_ms <= now).values(
                    tier_next_attempt_ms=now + TIER_LEASE_MS, tier_attempts=topups.c.tier_attempts + 1))
                if done.rowcount == 1:
                    claimed.append(TierJob(row.id, row.account_id, row.tier_attempts + 1))
        return claimed

    async def finish_tier_job(self, job: TierJob, done: bool) -> None:
        values = {"tier_status": billing.TIER_DONE} if done else {
            "tier_next_attempt_ms": self._clock() + min(1000 * 2 ** job.attempts, TIER_BACKOFF_MS_MAX)}
        async with self._engine.begin() as conn:
            await conn.execute(topups.update().where(topups.c.id == job.topup_id).values(**values))

    # --- emails ---

    async def queue_email(self, account_id: str, kind: str, dedupe_key: str, details: Mapping[str, str],
                          to: str = "") -> str:
        """Queues an email to the account's address (or `to`, the address a verification link
        goes to): queued, duplicate (that key was queued before) or no_address (the account
        has no verified address yet)."""
        try:
            async with self._engine.begin() as conn:
                status = await _queue(conn, account_id, kind, dedupe_key, details, self._clock(), to)
        except sa_exc.IntegrityError:
            return "duplicate"
        if status == "queued":
            self.journal.emails_ready.set()
        return status


async def _queue(conn: AsyncConnection, account_id: str, kind: str, dedupe_key: str, details: Mapping[str, str],
                 now_ms: int, to: str = "") -> str:
    row = (await conn.execute(sa.select(accounts.c.email, accounts.c.credits_posted - accounts.c.debits_posted)
                              .where(accounts.c.id == account_id))).first()
    if row is None:
        raise billing.NotFound(f"no account {account_id!r}", code="account_not_found", param="account_id")
    address = to or row[0]
    if not address:
        return "no_address"
    exists = (await conn.execute(sa.select(email_outbox.c.id).where(email_outbox.c.dedupe_key == dedupe_key))).first()
    if exists is not None:
        return "duplicate"
    await conn.execute(email_outbox.insert().values(
        account_id=account_id, to_addr=address, kind=kind, balance_nanos=int(row[1]), created_ms=now_ms,
        next_attempt_ms=now_ms, details=json.dumps(dict(details), sort_keys=True), dedupe_key=dedupe_key))
    return "queued"


def _topup(row) -> billing.Topup:
    return billing.Topup(id=row.id, account_id=row.account_id, amount_nanos=row.amount_nanos, currency=row.currency,
                         payment_method=row.payment_method, status=row.status, created_ms=row.created_ms,
                         card_brand=row.card_brand, card_last4=row.card_last4, failure_message=row.failure_message,
                         payment_intent_id=row.payment_intent_id, client_secret=row.client_secret,
                         credited_ms=row.credited_ms, tier_status=row.tier_status)
