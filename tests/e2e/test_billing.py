"""Prepaid credit end to end: the real Envoy, every service, the reference backend,
and a real SMTP server (aiosmtpd) receiving the balance notices.

What the public page promises, checked through Envoy with httpx and the official
openai client: $10 on signup; a call costs exactly usage x price and shows up in
/v1/usage; no credit is the seed's 402, to the byte, before anything runs, and
credit added works at once with the same key; an abandoned stream pays for what
was generated; a ledger outage is a 503 that runs nothing, while a call already
running is still charged once when the ledger is back; one email below $5 and
one at $0, armed again by a top-up; a burst on an almost empty account ends at
most one worst case below zero; nothing is charged twice.

The prices are the documented ones (ref-chat: $0.50 / $1.50 per million input /
output tokens), checked against the catalog, so a change there shows up here.
"""
import asyncio
import concurrent.futures
import dataclasses
import datetime
import email
import email.message
import email.policy
import random
import signal
import time

import httpx
import openai
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from common import catalog, money, pricing, tls
from devtool import up
from ledger_svc import check, domain
from tests.e2e.conftest import PASSWORD, Customer, assert_openai_error, eventually, mesh_mailing_to
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tokens.router.v1 import router_pb2

MODEL = "ref-chat"
# The documented list prices of ref-chat, in nano-dollars per million tokens.
PRICES = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}
BODY_402 = (b'{"error": {"message": "Insufficient credit. Add funds at https://tokens.flex.ai/dashboard/billing '
            b'to continue.", "type": "insufficient_quota", "code": "402"}}')
RATELIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
COST_HEADER = "x-usage-cost-usd"
# Settlement is asynchronous but fast: a call's usage row and charge land within this.
SETTLE_S_MAX = 10.0
# A restarted ledger_svc is healthy (and seen so by Envoy) within this.
RESTART_S_MAX = 30.0
# The router retries its settlement outbox every second (backing off to a few seconds).
OUTBOX_S_MAX = 30.0
EMAIL_S_MAX = 15.0
# How long "nothing more happens" is watched: several outbox retries and email sender wake-ups.
QUIET_S = 3.0
# The abandoned stream: the client leaves after this many content chunks; the tokens
# in flight between backend, router, Envoy and client when it does may also be charged.
CHUNKS_READ = 3
ABANDON_WINDOW = 5
BURST = 40


# The mesh, with a real SMTP server

@pytest.fixture(scope="module")
def mesh(tmp_path_factory, inbox):
    with mesh_mailing_to(tmp_path_factory.mktemp("billing-mesh"), inbox) as instance:
        yield instance


# Helpers

@dataclasses.dataclass
class Dashboard:
    """A customer's dashboard session: its reads do not count toward the key's rate limit."""

    base_url: str
    auth: dict[str, str]

    @classmethod
    def of(cls, base_url: str, customer: Customer) -> "Dashboard":
        reply = httpx.post(f"{base_url}/v1/sessions", json={"email": customer.email, "password": PASSWORD},
                           timeout=30)
        assert reply.status_code == 200, reply.text
        return cls(base_url, {"Authorization": f"Bearer {reply.json()['session_token']}"})

    def account(self) -> dict:
        reply = httpx.get(f"{self.base_url}/v1/account", headers=self.auth, timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def balance(self) -> int:
        return money.parse_usd(self.account()["balance_usd"])

    def usage(self) -> dict:
        reply = httpx.get(f"{self.base_url}/v1/usage", headers=self.auth, params={"limit": 1000}, timeout=30)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["has_more"] is False, "more usage than one page: this test made too many calls"
        return body

    def rows(self, request_id: str) -> list[dict]:
        return [row for row in self.usage()["data"] if row["request_id"] == request_id]

    def settled(self, request_id: str, timeout_s: float = SETTLE_S_MAX) -> dict:
        """The call's usage row, once its settlement has landed (and no hold is left)."""
        def probe():
            rows = self.rows(request_id)
            return rows if rows and self.account()["held_usd"] == "0.00" else None
        rows = eventually(probe, f"the settlement of {request_id}", timeout_s)
        assert len(rows) == 1, rows
        return rows[0]


def client(base_url: str, customer: Customer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=customer.api_key, max_retries=0, timeout=30)


def backend_stats(mesh: up.Mesh) -> dict:
    return httpx.get(f"http://127.0.0.1:{mesh.config.backend_port}/_stats", timeout=5).json()


def catalog_prices() -> dict[str, int]:
    prices = catalog.load(catalog.default_path()).get(MODEL).prices_nanos()
    assert prices == PRICES, f"ref-chat's catalog prices are not the documented ones: {prices}"
    return prices


def cost_of(units: dict) -> int:
    """units x price: the rule of common.pricing at the catalog's prices."""
    return pricing.cost_nanos(catalog_prices(), {"input_tokens": int(units["input_tokens"]),
                                                 "output_tokens": int(units["output_tokens"])})


def worst_case_nanos(messages: list[dict], max_tokens: int) -> int:
    """The hold for a chat call, worked out as ledger_svc/check.py works it out: every UTF-8
    byte of text a token plus 8 per message and 8 per call, and max_tokens of output
    (capped by the model's max_output_tokens), at the price in effect."""
    model = catalog.load(catalog.default_path()).get(MODEL)
    input_tokens = sum(len(m["content"].encode()) for m in messages) + 8 * len(messages) + 8
    output_tokens = min(max_tokens, model.limits["max_output_tokens"])
    by_hand = pricing.cost_nanos(catalog_prices(), {"input_tokens": input_tokens, "output_tokens": output_tokens})
    # And the same number from check.py's own reading of the request Envoy hands it.
    request = router_pb2.CreateChatCompletionRequest(model=MODEL, max_tokens=max_tokens)
    for m in messages:
        request.messages.add(role=m["role"]).content.string_value = m["content"]
    call = check.chat_call(request.SerializeToString())
    assert domain.worst_cost_nanos(catalog_prices(), domain.worst_text_units(call, model.limits)) == by_hand
    return by_hand


def journal_stats(operator) -> dict:
    stats = operator("stats")
    # proto3 JSON leaves zeros out.
    return {k: int(stats.get(k, 0)) for k in ("accounts", "transfers", "pending_holds", "sum_of_balances_nanos")}


def assert_402(reply: httpx.Response) -> None:
    assert reply.status_code == 402, (reply.status_code, reply.text)
    assert reply.content == BODY_402, reply.content
    assert reply.headers["content-type"].startswith("application/json")
    for name in RATELIMIT_HEADERS:
        assert reply.headers.get(name, "").isdigit(), (name, reply.headers)


# Tests

def test_signup_grants_ten_dollars(base_url, customer):
    reply = httpx.get(f"{base_url}/v1/account", headers=customer.auth, timeout=30)
    assert reply.status_code == 200, reply.text
    account = reply.json()
    assert account["balance_usd"] == "10.00" and account["available_usd"] == "10.00", account
    assert account["held_usd"] == "0.00", account


def test_a_call_costs_exactly_usage_times_price(base_url, customer):
    dash = Dashboard.of(base_url, customer)
    before = dash.balance()
    with client(base_url, customer) as api:
        raw = api.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=400,
            messages=[{"role": "user", "content": "[[tokens=333]] Tell me a long story about a river"}])
    reply = raw.parse()
    request_id = raw.headers["x-request-id"]
    usage = reply.usage
    assert usage.prompt_tokens == 9 + 4 + 3 and usage.completion_tokens == 333, usage
    expected = cost_of({"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens})
    assert expected == 16 * 500 + 333 * 1500  # nano-dollars, by hand
    assert money.parse_usd(usage.cost) == expected and usage.cost == money.usd(expected), usage
    assert raw.headers[COST_HEADER] == usage.cost

    row = dash.settled(request_id)
    after = dash.account()
    assert before - money.parse_usd(after["balance_usd"]) == expected, (before, after)
    assert after["available_usd"] == after["balance_usd"], after
    assert row["model"] == MODEL and row["outcome"] == "completed" and row["key_id"] == customer.key_id, row
    assert int(row["units"]["input_tokens"]) == usage.prompt_tokens
    assert int(row["units"]["output_tokens"]) == usage.completion_tokens
    assert row["cost_usd"] == usage.cost, row
    day = datetime.datetime.fromtimestamp(row["created"], tz=datetime.timezone.utc).strftime("%Y-%m-%d")
    assert abs(row["created"] - time.time()) < 60, row

    listed = dash.usage()
    assert listed["daily"] == [{
        "date": day, "model": MODEL, "requests": 1, "cost_usd": usage.cost,
        "units": {**row["units"]}}], listed["daily"]
    # Every count is a JSON number, as in OpenAI's usage API (not proto3's int64 strings).
    assert row["units"] == {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                            "images": 0, "video_ms": 0, "characters": 0, "audio_ms": 0}, row
    assert set(listed) == {"object", "data", "daily", "next_after", "has_more", "total_cost_usd"}, listed
    assert listed["total_cost_usd"] == usage.cost


def test_no_credit_is_the_documented_402_and_credit_works_at_once(mesh, base_url, customer, operator):
    operator("credit", customer.account_id, "-10", "--reason", "e2e: use up the signup credit")
    account = httpx.get(f"{base_url}/v1/account", headers=customer.auth, timeout=30).json()
    assert account["balance_usd"] == "0.00" and account["available_usd"] == "0.00", account
    before = backend_stats(mesh)["requests"]

    reply = httpx.post(f"{base_url}/v1/chat/completions", headers=customer.auth, timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5})
    assert_402(reply)
    with client(base_url, customer) as api:
        with pytest.raises(openai.APIStatusError) as caught:
            api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
        error = caught.value
        assert error.status_code == 402, error
        assert error.code == "402" and error.type == "insufficient_quota", error.body
        assert error.response.content == BODY_402
        # The streamed form of the call is refused the same way, before any byte of a stream.
        with pytest.raises(openai.APIStatusError) as caught:
            api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                        stream=True)
        assert caught.value.status_code == 402 and caught.value.response.content == BODY_402
        # Nothing ran.
        assert backend_stats(mesh)["requests"] == before

        operator("credit", customer.account_id, "5", "--reason", "e2e: top up")
        done = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=5)
    assert done.usage.completion_tokens == 5
    assert backend_stats(mesh)["requests"] == before + 1


def test_an_abandoned_stream_pays_for_what_was_generated(mesh, base_url, customer):
    dash = Dashboard.of(base_url, customer)
    balance = dash.balance()
    stats = backend_stats(mesh)
    with client(base_url, customer) as api:
        raw = api.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=500, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "[[tokens=500]] [[delay_ms=20]] Go on and on"}])
        request_id = raw.headers["x-request-id"]
        stream = raw.parse()
        received = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == CHUNKS_READ:
                    break
        stream.close()
    assert received == CHUNKS_READ

    row = dash.settled(request_id)
    assert row["outcome"] == "aborted", row
    output = int(row["units"]["output_tokens"])
    assert CHUNKS_READ <= output <= CHUNKS_READ + ABANDON_WINDOW, row
    assert int(row["units"]["input_tokens"]) == 6 + 4 + 3, row
    assert money.parse_usd(row["cost_usd"]) == cost_of(row["units"]), row
    assert balance - dash.balance() == cost_of(row["units"])

    # The backend stopped generating: the count does not move, and it is far from 500.
    def stopped():
        first = backend_stats(mesh)["tokens_generated"]
        time.sleep(0.5)  # 25 tokens' worth of its delay
        return backend_stats(mesh)["tokens_generated"] == first
    eventually(stopped, "the backend still generates", 5)
    after = backend_stats(mesh)
    generated = after["tokens_generated"] - stats["tokens_generated"]
    assert output <= generated <= output + ABANDON_WINDOW, (generated, output)
    assert after["streams_cancelled"] == stats["streams_cancelled"] + 1, after


def test_balance_emails_once_per_crossing_and_a_top_up_rearms_them(base_url, customer, operator, inbox):
    def notices(count: int) -> list[email.message.EmailMessage]:
        return eventually(lambda: len(inbox.to(customer.email)) >= count and inbox.to(customer.email),
                          f"{count} notices", EMAIL_S_MAX)

    def settle_down(count: int) -> list[email.message.EmailMessage]:
        time.sleep(QUIET_S)
        sent = inbox.to(customer.email)
        assert len(sent) == count, [m["Subject"] for m in sent]
        return sent

    assert inbox.to(customer.email) == []
    operator("credit", customer.account_id, "-5.5", "--reason", "e2e: below $5")
    low = notices(1)[0]
    assert low["Subject"] == "Your token-service balance is below $5.00", low["Subject"]
    assert low["To"] == customer.email and "billing@tokens.flex.ai" in low["From"]
    text = low.get_content()
    assert "$4.50" in text and "https://tokens.flex.ai/dashboard/billing" in text, text
    settle_down(1)

    operator("credit", customer.account_id, "-4.5", "--reason", "e2e: to $0")
    zero = notices(2)[1]
    assert zero["Subject"] == "Your token-service credit has run out", zero["Subject"]
    assert zero["To"] == customer.email
    text = zero.get_content()
    assert "$0.00" in text and "402" in text and "https://tokens.flex.ai/dashboard/billing" in text, text

    # Further down, up a little, down, up, down, all below $5 and back over $0 on the way: no more mail.
    operator("credit", customer.account_id, "-1", "--reason", "e2e: further down")
    operator("credit", customer.account_id, "0.5", "--reason", "e2e: a little up")
    operator("credit", customer.account_id, "-0.25", "--reason", "e2e: down again")
    operator("credit", customer.account_id, "4", "--reason", "e2e: up, still below $5")
    operator("credit", customer.account_id, "-1", "--reason", "e2e: down again")
    sent = settle_down(2)
    assert [m["Subject"] for m in sent].count("Your token-service balance is below $5.00") == 1

    # A top-up over $5 arms both notices again: the next drop below $5 mails, and so does $0,
    # this time reached by a call's charge.
    balance = operator("credit", customer.account_id, "6", "--reason", "e2e: top up")["balance"]
    assert balance["balance_usd"] == "8.25", balance
    settle_down(2)
    operator("credit", customer.account_id, "-8.2499", "--reason", "e2e: just above $0")
    again = notices(3)[2]
    assert again["Subject"] == "Your token-service balance is below $5.00" and "$0.0001" in again.get_content()
    with client(base_url, customer) as api:
        done = api.chat.completions.create(model=MODEL, max_tokens=200,
                                           messages=[{"role": "user", "content": "[[tokens=200]] Spend"}])
    assert money.parse_usd(done.usage.cost) > 100_000  # more than the $0.0001 left
    last = notices(4)[3]
    assert last["Subject"] == "Your token-service credit has run out", last["Subject"]
    subjects = [m["Subject"] for m in settle_down(4)]
    assert subjects.count("Your token-service credit has run out") == 2, subjects


async def test_a_burst_on_an_almost_empty_account_ends_at_most_one_worst_case_below_zero(
        base_url, customer, operator):
    await asyncio.to_thread(operator, "tier", customer.key_id, "paid")  # 300 a minute: no 429 in the burst
    left = await asyncio.to_thread(operator, "credit", customer.account_id, "-9.99999", "--reason", "e2e: almost empty")
    assert left["balance"]["balance_usd"] == "0.00001"
    messages = [{"role": "user", "content": "[[tokens=1000]] Spend everything there is"}]
    worst = worst_case_nanos(messages, 1000)
    assert worst == (len(messages[0]["content"]) + 16) * 500 + 1000 * 1500

    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=customer.api_key, max_retries=0,
                                  timeout=60) as api:
        async def one():
            try:
                raw = await api.chat.completions.with_raw_response.create(model=MODEL, messages=messages,
                                                                          max_tokens=1000)
            except openai.APIStatusError as error:
                return error.response
            return raw

        replies = await asyncio.gather(*(one() for _ in range(BURST)))
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 402}, statuses
    admitted = [r for r in replies if r.status_code == 200]
    assert admitted and statuses.count(402) >= 1, statuses
    for reply in replies:
        if reply.status_code == 402:
            assert reply.content == BODY_402
            assert all(reply.headers.get(h, "").isdigit() for h in RATELIMIT_HEADERS), reply.headers

    dash = Dashboard.of(base_url, customer)
    costs = {}
    for raw in admitted:
        row = await asyncio.to_thread(dash.settled, raw.headers["x-request-id"])
        costs[row["request_id"]] = money.parse_usd(row["cost_usd"])
        assert row["cost_usd"] == raw.parse().usage.cost == raw.headers[COST_HEADER]
    balance = dash.balance()
    assert balance == 10_000 - sum(costs.values()), (balance, costs)
    assert balance >= -worst, (balance, worst)
    stats = await asyncio.to_thread(journal_stats, operator)
    assert stats["sum_of_balances_nanos"] == 0, stats

    # Nothing was charged twice: one row per admitted call, each its own request id.
    rows = dash.usage()["data"]
    ids = [row["request_id"] for row in rows]
    assert len(ids) == len(set(ids)) == len(admitted), ids
    assert set(ids) == {r.headers["x-request-id"] for r in admitted}


async def test_every_call_is_charged_once(base_url, customer, operator):
    await asyncio.to_thread(operator, "tier", customer.key_id, "paid")
    dash = Dashboard.of(base_url, customer)
    before = dash.balance()
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=customer.api_key, max_retries=0,
                                  timeout=60) as api:
        async def unary(n: int) -> tuple[str, str]:
            raw = await api.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=50, messages=[{"role": "user", "content": f"[[tokens={n}]] Count"}])
            return raw.headers["x-request-id"], raw.parse().usage.cost

        async def streamed(n: int) -> tuple[str, str]:
            raw = await api.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=50, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"[[tokens={n}]] Count"}])
            chunks = [chunk async for chunk in raw.parse()]
            return raw.headers["x-request-id"], chunks[-1].usage.cost

        calls = await asyncio.gather(*(unary(n) for n in range(1, 9)), *(streamed(n) for n in range(1, 5)))
    charged = {rid: cost for rid, cost in calls}
    assert len(charged) == len(calls)

    rows = eventually(lambda: len(dash.usage()["data"]) >= len(calls) and dash.usage()["data"], "usage rows",
                      SETTLE_S_MAX)
    time.sleep(QUIET_S)
    rows = dash.usage()["data"]
    assert sorted(row["request_id"] for row in rows) == sorted(charged), rows
    assert {row["request_id"]: row["cost_usd"] for row in rows} == charged
    total = sum(money.parse_usd(cost) for cost in charged.values())
    assert before - dash.balance() == total
    assert money.parse_usd(dash.usage()["total_cost_usd"]) == total


def test_a_settlement_replayed_to_the_ledger_is_charged_once(mesh, base_url, customer):
    """What the router's outbox does after an unanswered Settle, done on purpose: the same
    settlement sent again and again, at once and later, to ledger_svc's internal API."""
    dash = Dashboard.of(base_url, customer)
    before = dash.balance()
    request_id = f"e2e-replay-{random.getrandbits(64):x}"
    body = router_pb2.CreateChatCompletionRequest(model=MODEL, max_tokens=20)
    body.messages.add(role="user").content.string_value = "Hello"
    payload = body.SerializeToString()
    checked = external_auth_pb2.CheckRequest()
    http = checked.attributes.request.http
    http.path = "/tokens.router.v1.Inference/Chat"
    http.headers.update({"x-ts-account": customer.account_id, "x-ts-key": customer.key_id,
                         "x-request-id": request_id, "content-type": "application/grpc"})
    http.raw_body = b"\x00" + len(payload).to_bytes(4, "big") + payload
    units = ledger_pb2.Units(input_tokens=9, output_tokens=20)
    settlement = ledger_pb2.Settlement(outcome="completed", request_id=request_id, units=units,
                                       ended_ms=int(time.time() * 1000))
    with tls.blocking_channel(f"127.0.0.1:{mesh.config.grpc_port('ledger_svc')}", mesh.config.tls_files()) as channel:
        decision = external_auth_pb2_grpc.AuthorizationStub(channel).Check(checked, timeout=10)
        assert decision.status.code == 0, decision
        hold = {h.header.key: h.header.value for h in decision.ok_response.headers}["x-ts-hold"]
        settlement.hold_id = hold
        ledger = ledger_pb2_grpc.LedgerStub(channel)
        request = ledger_pb2.SettleRequest(settlements=[settlement, settlement])
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: ledger.Settle(request, timeout=10), range(4)))
        answers.append(ledger.Settle(request, timeout=10))
        statuses = [r.status for answer in answers for r in answer.results]
        assert statuses.count("posted") == 1 and statuses.count("duplicate") == len(statuses) - 1, statuses
        expected = cost_of({"input_tokens": 9, "output_tokens": 20})
        assert {r.cost_nanos for answer in answers for r in answer.results} == {expected}
        # The same hold settled with other units is refused, and changes nothing.
        other = ledger_pb2.Settlement(hold_id=hold, outcome="completed", request_id=request_id,
                                      units=ledger_pb2.Units(input_tokens=9, output_tokens=19),
                                      ended_ms=settlement.ended_ms)
        conflict = ledger.Settle(ledger_pb2.SettleRequest(settlements=[other]), timeout=10)
        assert [r.status for r in conflict.results] == ["conflict"]

    row = dash.settled(request_id)
    assert money.parse_usd(row["cost_usd"]) == expected and row["units"]["output_tokens"] == 20, row
    assert before - dash.balance() == expected
    assert [r["request_id"] for r in dash.usage()["data"]] == [request_id]


@pytest.mark.timeout(RESTART_S_MAX + OUTBOX_S_MAX + 60)
def test_a_ledger_outage_runs_nothing_new_and_settles_the_call_in_flight_once_it_is_back(
        mesh, base_url, customer, operator):
    dash = Dashboard.of(base_url, customer)
    before = dash.balance()
    tokens = 60
    with client(base_url, customer) as api:
        raw = api.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=tokens, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"[[tokens={tokens}]] [[delay_ms=50]] A slow answer"}])
        request_id = raw.headers["x-request-id"]
        chunks = iter(raw.parse())
        first = next(chunks)
        words = [c.delta.content for c in first.choices if c.delta.content]
        restarted = False
        mesh.stop_one("ledger_svc#0", signal.SIGKILL)
        try:
            # New calls: 503 in OpenAI's shape, and nothing runs.
            ran = backend_stats(mesh)["requests"]
            reply = httpx.post(f"{base_url}/v1/chat/completions", headers=customer.auth, timeout=30,
                               json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
            assert_openai_error(reply, 503)
            with pytest.raises(openai.InternalServerError) as caught:
                api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
            assert caught.value.status_code == 503
            with pytest.raises(openai.InternalServerError):
                api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            stream=True)
            assert backend_stats(mesh)["requests"] == ran

            # The call that was already running completes for its client.
            rest = list(chunks)
            words += [c.choices[0].delta.content for c in rest if c.choices and c.choices[0].delta.content]
            assert len(words) == tokens, words
            usage = rest[-1].usage
            assert usage.completion_tokens == tokens
            cost = money.parse_usd(usage.cost)
            assert cost == cost_of({"input_tokens": usage.prompt_tokens, "output_tokens": tokens})

            started = time.monotonic()
            mesh.start_service("ledger_svc", 0)
            mesh.wait_healthy(RESTART_S_MAX)
            restarted = True
            took = time.monotonic() - started
            assert took < RESTART_S_MAX, took
        finally:
            if not restarted:
                mesh.start_service("ledger_svc", 0)
                mesh.wait_healthy(RESTART_S_MAX)

    # Its settlement waited in the router's outbox and lands now, once.
    row = dash.settled(request_id, OUTBOX_S_MAX)
    assert row["outcome"] == "completed" and row["cost_usd"] == usage.cost, row
    assert int(row["units"]["output_tokens"]) == tokens
    time.sleep(QUIET_S)
    assert len(dash.rows(request_id)) == 1
    assert [r["request_id"] for r in dash.usage()["data"]] == [request_id]
    assert before - dash.balance() == cost
    assert journal_stats(operator)["sum_of_balances_nanos"] == 0
    # And calls run again.
    with client(base_url, customer) as api:
        assert api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Back?"}],
                                           max_tokens=2).usage.completion_tokens == 2
