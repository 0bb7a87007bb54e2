"""Stripe, through the official `stripe` library: every call async, bounded by a timeout, never retried.

Retries are left out on purpose: Stripe honours idempotency keys (we send one
per top-up) but localstripe ignores them, so a retried create could charge
twice there. A call that fails or times out is reported as Unreachable, and
the caller decides what that means (billing leaves a charge whose outcome is
unknown pending, and Stripe's event settles it).
"""
import asyncio
import dataclasses

import stripe


class StripeFailure(Exception):
    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class CardDeclined(StripeFailure):
    """The bank or Stripe refused the card; `message` is written for the customer."""


class Rejected(StripeFailure):
    """Stripe refused the request itself (no such payment method, one of another customer...)."""


class Unreachable(StripeFailure):
    """No answer, a timeout, or a Stripe-side error: the outcome of the call is unknown."""


@dataclasses.dataclass(frozen=True)
class Card:
    id: str
    customer: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    created_s: int


@dataclasses.dataclass(frozen=True)
class Intent:
    id: str
    status: str
    client_secret: str


class Gateway:
    def __init__(self, api_key: str, api_base: str = "", timeout_s: float = 10.0) -> None:
        self._timeout_s = timeout_s
        # aiohttp rather than httpx: stripe's httpx client sends bodies in a way httpx deprecates.
        self._http = stripe.AIOHTTPClient(timeout=timeout_s)
        self._client = stripe.StripeClient(api_key, base_addresses={"api": api_base} if api_base else None,
                                           http_client=self._http, max_network_retries=0)

    async def close(self) -> None:
        await self._http.close_async()

    async def _call(self, method, *args):
        try:
            async with asyncio.timeout(self._timeout_s):
                return await method(*args)
        except stripe.CardError as error:
            raise CardDeclined(error.user_message or "Your card was declined.", error.code or "card_declined") \
                from None
        except stripe.InvalidRequestError as error:
            raise Rejected(error.user_message or str(error), error.code or "invalid_request") from None
        except TimeoutError:
            raise Unreachable(f"Stripe did not answer within {self._timeout_s:g} s", "timeout") from None
        except stripe.StripeError as error:
            raise Unreachable(f"Stripe: {error.user_message or error}", error.code or "stripe_error") from None

    async def create_customer(self, account_id: str, email: str) -> str:
        params = {"metadata": {"account_id": account_id}}
        if email:
            params["email"] = email
        # The same key within 24 h returns the same customer (on Stripe; localstripe ignores it).
        customer = await self._call(self._client.v1.customers.create_async, params,
                                    {"idempotency_key": f"customer-{account_id}"})
        return customer.id

    async def card(self, payment_method_id: str) -> Card:
        return _card(await self._call(self._client.v1.payment_methods.retrieve_async, payment_method_id))

    async def attach(self, payment_method_id: str, customer_id: str) -> Card:
        return _card(await self._call(self._client.v1.payment_methods.attach_async, payment_method_id,
                                      {"customer": customer_id}))

    async def detach(self, payment_method_id: str) -> Card:
        return _card(await self._call(self._client.v1.payment_methods.detach_async, payment_method_id))

    async def cards(self, customer_id: str, limit: int = 20) -> list[Card]:
        page = await self._call(self._client.v1.payment_methods.list_async,
                                {"customer": customer_id, "type": "card", "limit": limit})
        return [_card(method) for method in page.data]

    async def setup_intent(self, customer_id: str) -> Intent:
        intent = await self._call(self._client.v1.setup_intents.create_async,
                                  {"customer": customer_id, "payment_method_types": ["card"], "usage": "off_session"})
        return Intent(intent.id, intent.status, intent.client_secret or "")

    async def charge(self, customer_id: str, payment_method_id: str, amount_cents: int, currency: str,
                     metadata: dict[str, str], idempotency_key: str) -> Intent:
        """Creates and confirms a PaymentIntent in one call (localstripe cannot confirm one with a
        payment method given at confirm time)."""
        intent = await self._call(self._client.v1.payment_intents.create_async, {
            "amount": amount_cents, "currency": currency, "customer": customer_id,
            "payment_method": payment_method_id, "payment_method_types": ["card"], "confirm": True,
            "metadata": metadata}, {"idempotency_key": idempotency_key})
        return Intent(intent.id, intent.status, intent.client_secret or "")

    async def intent(self, payment_intent_id: str) -> dict:
        return (await self._call(self._client.v1.payment_intents.retrieve_async, payment_intent_id)).to_dict()

    async def find_intent(self, payment_intent_id: str) -> dict | None:
        """The PaymentIntent, or None when Stripe has no such one."""
        try:
            return await self.intent(payment_intent_id)
        except Rejected:
            return None

    async def intent_pages(self, created_gte_s: int = 0, page_size: int = 100):
        """Every PaymentIntent created since `created_gte_s` (0: all), as plain dicts, a page
        at a time; each page is one call, bounded like every other."""
        params: dict = {"limit": page_size}
        if created_gte_s > 0:
            params["created"] = {"gte": created_gte_s}
        while True:
            page = await self._call(self._client.v1.payment_intents.list_async, params)
            yield [intent.to_dict() for intent in page.data]
            if not page.has_more or not page.data:
                return
            params = {**params, "starting_after": page.data[-1].id}


class BadSignature(Exception):
    pass


def verify_event(payload: bytes, signature: str, secret: str, tolerance_s: int) -> dict:
    """The event Stripe signed, as a plain dict; BadSignature when the signature is missing,
    wrong, or older than `tolerance_s` (a replay)."""
    try:
        event = stripe.Webhook.construct_event(payload, signature, secret, tolerance=tolerance_s)
    except stripe.SignatureVerificationError as error:
        raise BadSignature(str(error)) from None
    except ValueError:
        raise BadSignature("the payload is not JSON") from None
    return event.to_dict()


def _card(method) -> Card:
    card = method.card if getattr(method, "type", "card") == "card" else None
    customer = method.customer
    return Card(id=method.id, customer=customer if isinstance(customer, str) else getattr(customer, "id", "") or "",
                brand=str(getattr(card, "brand", "") or "") if card else "",
                last4=str(getattr(card, "last4", "") or "") if card else "",
                exp_month=int(getattr(card, "exp_month", 0) or 0) if card else 0,
                exp_year=int(getattr(card, "exp_year", 0) or 0) if card else 0,
                created_s=int(getattr(method, "created", 0) or 0))
