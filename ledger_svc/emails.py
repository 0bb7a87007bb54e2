"""Balance notices: the outbox rows the journal writes, rendered and sent over SMTP (or as .eml files).

The posting that crosses a line writes the notice to the outbox in its own
transaction; this sender delivers it later, so a slow mail server never slows
a call. Each row is claimed with a lease (a sender that dies lets it come due
again: delivery is at least once), retried with backoff, and given up after
ATTEMPTS_MAX tries.
"""
import asyncio
import dataclasses
import email.message
import email.utils
import json
import logging
import pathlib
import smtplib
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Protocol

from common import money
from ledger_svc import billing, domain, metrics, store as store_mod
from ratelimit_svc import tiers

log = logging.getLogger(__name__)

BATCH = 50
ATTEMPTS_MAX = 8
LEASE_MS = 120_000
POLL_S = 5.0
SMTP_TIMEOUT_S = 10.0
# Billing's emails (ledger_svc.billing): a failed top-up, a tier change, a verification link.
BILLING_KINDS = (billing.EMAIL_TOPUP_FAILED, billing.EMAIL_TIER_CHANGED, billing.EMAIL_VERIFY)


@dataclasses.dataclass(frozen=True)
class Branding:
    from_addr: str
    public_base_url: str
    low_balance_nanos: int


def render(fields: Mapping, brand: Branding) -> email.message.EmailMessage:
    """The email for one outbox row (kind low or zero, or one of billing's)."""
    if fields["kind"] in BILLING_KINDS:
        return _render_billing(fields, brand)
    balance = money.usd(fields["balance_nanos"])
    line = money.usd(brand.low_balance_nanos)
    billing = f"{brand.public_base_url}/dashboard/billing"
    message = email.message.EmailMessage()
    message["From"] = brand.from_addr
    message["To"] = fields["to_addr"]
    message["Date"] = email.utils.formatdate(fields["created_ms"] / 1000, usegmt=True)
    message["Message-ID"] = f"<notice-{fields['kind']}-{fields['id']}@tokens.flex.ai>"
    if fields["kind"] == domain.ZERO:
        message["Subject"] = "Your token-service credit has run out"
        text = (f"Your balance has reached ${balance}.\n\n"
                "API calls now return 402 Payment Required until you add credit. Add funds at\n"
                f"{billing}\nand your next call succeeds with the same key.\n")
    else:
        message["Subject"] = f"Your token-service balance is below ${line}"
        text = (f"Your balance is now ${balance}, below ${line}.\n\n"
                "There is no auto-recharge: when it reaches $0, API calls return 402 Payment Required.\n"
                f"Add funds at {billing}\n")
    message.set_content(text)
    return message


def _render_billing(fields: Mapping, brand: Branding) -> email.message.EmailMessage:
    details = json.loads(fields.get("details") or "{}")
    message = email.message.EmailMessage()
    message["From"] = brand.from_addr
    message["To"] = fields["to_addr"]
    message["Date"] = email.utils.formatdate(fields["created_ms"] / 1000, usegmt=True)
    message["Message-ID"] = f"<{fields['kind'].replace('_', '-')}-{fields['id']}@tokens.flex.ai>"
    billing_url = f"{brand.public_base_url}/dashboard/billing"
    if fields["kind"] == billing.EMAIL_VERIFY:
        message["Subject"] = "Verify your email for token-service"
        text = ("Follow this link to verify your email address and start using your API key and its free "
                f"credit:\n\n    {details.get('link', '')}\n\n"
                f"The link works for {details.get('hours', '72')} hours. If you did not sign up, ignore this "
                "email: nothing will be sent to you again.\n")
    elif fields["kind"] == billing.EMAIL_TOPUP_FAILED:
        card = f" on your {details['card']}" if details.get("card") else ""
        message["Subject"] = f"Your ${details.get('amount_usd', '')} top-up did not go through"
        text = (f"We could not charge ${details.get('amount_usd', '')}{card}:\n\n"
                f"    {details.get('message', 'The payment was declined.')}\n\n"
                f"Nothing was charged and your balance is unchanged (${money.usd(fields['balance_nanos'])}).\n"
                f"Try another card at {billing_url}\n")
    else:
        tier = tiers.lookup(details.get("tier", ""))
        message["Subject"] = f"Your API keys are now on the {tier.name.capitalize()} tier"
        text = (f"Your upgrade request was approved: every API key of your account now allows "
                f"{tier.requests_per_minute} requests per minute ({tier.name.capitalize()} tier), "
                "starting with your next call.\n\n"
                f"See your limits at {brand.public_base_url}/dashboard/limits\n")
    message.set_content(text)
    return message


class Transport(Protocol):
    def send(self, messages: Sequence[email.message.EmailMessage]) -> list[str | None]:
        """Sends each message (blocking); returns None for each sent, or the error."""


class SmtpTransport:
    """smtp://host:port (plain, STARTTLS when offered) or smtps://user:password@host:port."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self._ssl = parsed.scheme == "smtps"
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or (465 if self._ssl else 25)
        self._user = urllib.parse.unquote(parsed.username or "")
        self._password = urllib.parse.unquote(parsed.password or "")

    def send(self, messages: Sequence[email.message.EmailMessage]) -> list[str | None]:
        factory = smtplib.SMTP_SSL if self._ssl else smtplib.SMTP
        try:
            with factory(self._host, self._port, timeout=SMTP_TIMEOUT_S) as smtp:
                smtp.ehlo()
                if not self._ssl and smtp.has_extn("starttls"):
                    smtp.starttls()
                    smtp.ehlo()
                if self._user:
                    smtp.login(self._user, self._password)
                results: list[str | None] = []
                for message in messages:
                    try:
                        smtp.send_message(message)
                        results.append(None)
                    except smtplib.SMTPException as error:
                        results.append(repr(error))
                return results
        except (OSError, smtplib.SMTPException) as error:
            return [repr(error)] * len(messages)


class FileTransport:
    """Writes each message as an .eml file: the embedded default, with no mail server."""

    def __init__(self, directory: pathlib.Path) -> None:
        self._dir = directory

    def send(self, messages: Sequence[email.message.EmailMessage]) -> list[str | None]:
        self._dir.mkdir(parents=True, exist_ok=True)
        results: list[str | None] = []
        for message in messages:
            name = message["Message-ID"].strip("<>").split("@")[0]
            path = self._dir / f"{name}.eml"
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_bytes(bytes(message))
                tmp.replace(path)
                results.append(None)
            except OSError as error:
                results.append(repr(error))
        return results


def transport_for(smtp_url: str, emails_dir: pathlib.Path) -> Transport:
    return SmtpTransport(smtp_url) if smtp_url else FileTransport(emails_dir)


class Sender:
    def __init__(self, store: store_mod.SqlStore, transport: Transport, brand: Branding,
                 clock: domain.Clock) -> None:
        self._store = store
        self._transport = transport
        self._brand = brand
        self._clock = clock

    async def run_once(self) -> int:
        """Sends what is due; returns how many rows it handled."""
        jobs = await self._store.claim("email", BATCH, LEASE_MS)
        if not jobs:
            return 0
        messages = [render({**job.fields, "id": job.id}, self._brand) for job in jobs]
        results = await asyncio.to_thread(self._transport.send, messages)
        sent = [job.id for job, error in zip(jobs, results) if error is None]
        await self._store.finish("email", sent, sent=True)
        metrics.OUTBOX_SENT.labels(outbox="email").inc(len(sent))
        metrics.OUTBOX_FAILED.labels(outbox="email").inc(len(jobs) - len(sent))
        for job, error in zip(jobs, results):
            if error is None:
                log.info("notice sent", extra={"kind": job.fields["kind"], "account": job.fields["account_id"]})
            elif job.attempts >= ATTEMPTS_MAX:
                await self._store.finish("email", [job.id], sent=False, error=error)
                log.error("notice given up", extra={"outbox_id": job.id, "error": error})
            else:
                await self._store.finish("email", [job.id], sent=False, error=error,
                                         retry_at_ms=self._clock() + store_mod.outbox_backoff_ms(job.attempts))
        return len(jobs)

    async def run(self) -> None:
        await store_mod.drain_outbox(self.run_once, self._store.emails_ready, BATCH, POLL_S, "email")
