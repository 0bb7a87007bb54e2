"""ledger_svc built with build_server on port 0 against SQLite, called through its real stubs."""
import asyncio
import base64
import dataclasses
import email
import json

import aiohttp.web
import grpc
import pytest
from aiosmtpd.controller import Controller
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from common import config as common_config, db, migrate, pricing
from ledger_svc import config, domain, emails, lago_client, server, testing
from tests.conftest import free_port
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tokens.router.v1 import router_pb2

pytestmark = pytest.mark.timeout(120)

USD = 1_000_000_000
BODY_402 = ('{"error": {"message": "Insufficient credit. Add funds at https://tokens.flex.ai/dashboard/billing '
            'to continue.", "type": "insufficient_quota", "code": "402"}}')


@dataclasses.dataclass
class Running:
    settings: config.Settings
    store: object
    clock: testing.FakeClock
    check: external_auth_pb2_grpc.AuthorizationStub
    ledger: ledger_pb2_grpc.LedgerStub
    usage: ledger_pb2_grpc.UsageStub

    async def allow(self, account_id: str, request_id: str = "req-1", **chat) -> tuple[str, str]:
        answer = await self.check.Check(testing.check_request(testing.frame(testing.chat_request(**chat)),
                                                              account_id=account_id, request_id=request_id))
        assert answer.HasField("ok_response"), answer
        headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
        return headers["x-ts-hold"], headers["x-ts-price"]

    async def settle(self, hold_id: str, input_tokens: int, output_tokens: int, request_id: str = "req-1"):
        response = await self.ledger.Settle(ledger_pb2.SettleRequest(settlements=[ledger_pb2.Settlement(
            hold_id=hold_id, outcome="completed", request_id=request_id, ended_ms=self.clock(),
            units=ledger_pb2.Units(input_tokens=input_tokens, output_tokens=output_tokens))]))
        return response.results[0]


def make_settings(tmp_path, **overrides) -> config.Settings:
    base = config.Settings(
        server=common_config.ServerSettings(host="127.0.0.1", port=0, log_level="INFO", drain_s=0.0, grace_s=1.0),
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}", database_schema=None,
        catalog_path=testing.write_catalog(tmp_path), signup_credit_nanos=10 * USD, low_balance_nanos=5 * USD,
        public_base_url=config.PUBLIC_BASE_URL_DEFAULT, hold_ttl_s=900, smtp_url="", email_from="billing@test",
        emails_dir=tmp_path / "emails", lago_api_url="", lago_api_key="", lago_event_code="api_call",
        batch_max=1000, batch_linger_ms=1.0, batch_workers=1, price_refresh_s=2.0)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def start(tmp_path):
    """Returns an async factory: start(**settings overrides) -> Running."""
    stops = []

    async def factory(**overrides) -> Running:
        settings = make_settings(tmp_path, **overrides)
        await migrate.upgrade("ledger_svc", settings.database_url)
        engine = db.make_engine(settings.database_url)
        clock = testing.FakeClock()
        store = server.make_store(settings, engine, clock)
        await server.seed_prices(settings, store)
        grpc_server, port, _health = server.build_server(settings, store, clock)
        await grpc_server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

        async def stop() -> None:
            await channel.close()
            await grpc_server.stop(None)
            await store.close()
            await engine.dispose()

        stops.append(stop)
        return Running(settings, store, clock, external_auth_pb2_grpc.AuthorizationStub(channel),
                       ledger_pb2_grpc.LedgerStub(channel), ledger_pb2_grpc.UsageStub(channel))

    yield factory
    for stop in reversed(stops):
        await stop()


async def test_check_holds_the_worst_case_and_settle_charges_the_real_cost(start):
    ledger = await start()
    opened = await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_1", email="a@x.test"))
    assert (opened.balance_usd, opened.available_usd) == ("10.00", "10.00")
    text = "Say hello to the whole world, politely."
    hold_id, price_header = await ledger.allow("acct_1", text=text, max_tokens=100, n=2)
    prices = pricing.decode_header(price_header)
    assert prices == {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}
    worst = pricing.cost_nanos(prices, {"input_tokens": len(text) + 8 + 8, "output_tokens": 2 * 100})
    balance = await ledger.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id="acct_1"))
    assert (balance.held_nanos, balance.available_nanos) == (worst, 10 * USD - worst)

    result = await ledger.settle(hold_id, input_tokens=12, output_tokens=150)
    cost = pricing.cost_nanos(prices, {"input_tokens": 12, "output_tokens": 150})
    assert (result.status, result.cost_nanos) == ("posted", cost)
    balance = await ledger.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id="acct_1"))
    assert (balance.balance_nanos, balance.held_nanos) == (10 * USD - cost, 0)
    assert balance.balance_usd == "9.999769"
    again = await ledger.settle(hold_id, input_tokens=12, output_tokens=150)
    assert (again.status, again.cost_nanos) == ("duplicate", cost)

    usage = await ledger.usage.ListUsage(ledger_pb2.ListUsageRequest(), metadata=(("x-ts-account", "acct_1"),))
    assert [(r.request_id, r.model, r.cost_usd, r.units.output_tokens) for r in usage.data] == [
        ("req-1", "ref-chat", "0.000231", 150)]
    assert (usage.object, usage.total_cost_usd, usage.has_more) == ("list", "0.000231", False)
    assert [(d.date, d.model, d.requests) for d in usage.daily] == [("2026-01-01", "ref-chat", 1)]
    # The HTTP binding's page: the same rows, every count a JSON number.
    http = await ledger.usage.ListUsageHttp(ledger_pb2.ListUsageRequest(), metadata=(("x-ts-account", "acct_1"),))
    assert http.content_type == "application/json"
    page = json.loads(http.data)
    assert page["data"] == [{"request_id": "req-1", "created": usage.data[0].created, "key_id": "key_1",
                             "model": "ref-chat", "cost_usd": "0.000231", "outcome": "completed",
                             "units": {"input_tokens": 12, "output_tokens": 150, "images": 0, "video_ms": 0,
                                       "characters": 0, "audio_ms": 0}}]
    assert page["daily"] == [{"date": "2026-01-01", "model": "ref-chat", "requests": 1, "cost_usd": "0.000231",
                              "units": page["data"][0]["units"]}]
    assert (page["object"], page["has_more"], page["next_after"], page["total_cost_usd"]) == (
        "list", False, "", "0.000231")
    stats = await ledger.ledger.GetJournalStats(ledger_pb2.GetJournalStatsRequest())
    assert (stats.sum_of_balances_nanos, stats.pending_holds) == (0, 0)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ledger.usage.ListUsage(ledger_pb2.ListUsageRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_claimed_hold_outlives_the_claim_window_and_an_orphan_does_not(start):
    """The orphan is a call Envoy held but whose client left before router_svc ran it."""
    ledger = await start(hold_claim_s=30)
    await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_1", email="a@x.test"))
    orphan, _ = await ledger.allow("acct_1", request_id="req-orphan", max_tokens=100)
    running, _ = await ledger.allow("acct_1", request_id="req-running", max_tokens=100)
    claimed = await ledger.ledger.ClaimHolds(ledger_pb2.ClaimHoldsRequest(hold_ids=[running, "unknown-hold"]))
    assert claimed.claimed == 1
    ledger.clock.advance(30_001)
    assert await ledger.store.expire_due() == 1
    stats = await ledger.ledger.GetJournalStats(ledger_pb2.GetJournalStatsRequest())
    assert stats.pending_holds == 1
    assert (await ledger.store.get_hold(orphan)).status == "expired"
    result = await ledger.settle(running, input_tokens=10, output_tokens=20, request_id="req-running")
    assert result.status == "posted"
    balance = await ledger.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id="acct_1"))
    assert (balance.held_nanos, balance.balance_nanos) == (0, 10 * USD - result.cost_nanos)
    for bad in (["x"] * 1001, [""], ["h" * 65]):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ledger.ledger.ClaimHolds(ledger_pb2.ClaimHoldsRequest(hold_ids=bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_402_with_the_exact_body_until_credit_is_added(start):
    ledger = await start()
    await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_2"))
    await ledger.ledger.Credit(ledger_pb2.CreditRequest(account_id="acct_2", amount_nanos=-10 * USD,
                                                        transfer_id="adj-1", reason="test", kind="adjustment"))
    body = testing.frame(testing.chat_request())
    http = await ledger.check.Check(testing.check_request(body, account_id="acct_2"))
    assert http.WhichOneof("http_response") == "denied_response"
    assert http.denied_response.status.code == 402
    assert http.denied_response.body == BODY_402
    assert json.dumps(json.loads(BODY_402)) == BODY_402
    http_headers = {h.header.key: h.header.value for h in http.denied_response.headers}
    assert http_headers == {"content-type": "application/json"}

    native = await ledger.check.Check(testing.check_request(body, account_id="acct_2", grpc_caller=True))
    assert native.denied_response.status.code == 402
    headers = {h.header.key: h.header.value for h in native.denied_response.headers}
    assert headers["grpc-status"] == "9"  # FAILED_PRECONDITION
    details = headers["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
    assert status.code == 9 and status.message == BODY_402
    quota = [d for d in status.details if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR)]
    assert len(quota) == 1

    credited = await ledger.ledger.Credit(ledger_pb2.CreditRequest(
        account_id="acct_2", amount_nanos=5 * USD, transfer_id="pi_1", reason="top-up", kind="payment"))
    assert (credited.status, credited.balance.balance_usd) == ("created", "5.00")
    hold_id, _price = await ledger.allow("acct_2")
    assert hold_id
    replay = await ledger.ledger.Credit(ledger_pb2.CreditRequest(
        account_id="acct_2", amount_nanos=5 * USD, transfer_id="pi_1", reason="top-up", kind="payment"))
    assert replay.status == "duplicate"
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await ledger.ledger.Credit(ledger_pb2.CreditRequest(
            account_id="acct_2", amount_nanos=6 * USD, transfer_id="pi_1", reason="top-up", kind="payment"))
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "exists_with_different_amount" in conflict.value.details()


async def test_unknown_models_methods_and_bodies(start):
    ledger = await start()
    await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_3"))
    missing = await ledger.check.Check(testing.check_request(
        testing.frame(testing.chat_request(model="gpt-nope")), account_id="acct_3"))
    assert missing.denied_response.status.code == 404
    assert json.loads(missing.denied_response.body) == {"error": {
        "message": "The model `gpt-nope` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    image = await ledger.check.Check(testing.check_request(
        testing.frame(testing.chat_request(model="ref-image")), account_id="acct_3"))
    assert image.denied_response.status.code == 400
    models = await ledger.check.Check(testing.check_request(
        b"\x00\x00\x00\x00\x00", account_id="acct_3", path="/tokens.router.v1.Inference/ListModels"))
    assert models.HasField("ok_response") and not models.ok_response.headers
    usage = await ledger.check.Check(testing.check_request(b"", path="/tokens.ledger.v1.Usage/ListUsage"))
    assert usage.HasField("ok_response")
    unknown = await ledger.check.Check(testing.check_request(
        b"", account_id="acct_3", path="/tokens.router.v1.Inference/CreateEmbedding"))
    assert unknown.denied_response.status.code == 404
    garbage = await ledger.check.Check(testing.check_request(b"\x00\x00\x00\x00\x03\xff\xff\xff",
                                                             account_id="acct_3"))
    assert garbage.denied_response.status.code == 400
    # A frame longer than what arrived: Envoy cut a body over the route's limit.
    cut = await ledger.check.Check(testing.check_request(b"\x00\x00\x00\x00\x09abc", account_id="acct_3"))
    assert cut.denied_response.status.code == 413
    nobody = await ledger.check.Check(testing.check_request(testing.frame(testing.chat_request())))
    assert nobody.denied_response.status.code == 401
    stranger = await ledger.check.Check(testing.check_request(testing.frame(testing.chat_request()),
                                                              account_id="acct_never_opened"))
    assert stranger.denied_response.status.code == 403
    stats = await ledger.ledger.GetJournalStats(ledger_pb2.GetJournalStatsRequest())
    assert stats.pending_holds == 0


async def test_prices_are_versioned_through_the_api(start):
    ledger = await start()
    prices = await ledger.ledger.GetPrices(ledger_pb2.GetPricesRequest(models=["ref-chat"]))
    assert [(p.model, p.version, dict(p.pricing)) for p in prices.prices] == [
        ("ref-chat", 1, {"input_per_million_tokens": "0.50", "output_per_million_tokens": "1.50"})]
    await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_4"))
    hold_id, old_header = await ledger.allow("acct_4")
    changed = await ledger.ledger.SetPrice(ledger_pb2.SetPriceRequest(
        model="ref-chat", pricing={"input_per_million_tokens": "1.00", "output_per_million_tokens": "3.00"}))
    assert changed.version == 2
    _, new_header = await ledger.allow("acct_4", request_id="req-2")
    assert pricing.decode_header(new_header)["output_per_million_tokens"] == 3 * USD
    result = await ledger.settle(hold_id, 20, 60)  # within its hold (64 output tokens)
    assert result.cost_nanos == pricing.cost_nanos(pricing.decode_header(old_header),
                                                   {"input_tokens": 20, "output_tokens": 60})
    with pytest.raises(grpc.aio.AioRpcError) as past:
        await ledger.ledger.SetPrice(ledger_pb2.SetPriceRequest(model="ref-chat", effective_from=1,
                                                                pricing={"input_per_million_tokens": "1"}))
    assert past.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as wrong_unit:
        await ledger.ledger.SetPrice(ledger_pb2.SetPriceRequest(model="ref-chat", pricing={"per_image": "1"}))
    assert wrong_unit.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []

    async def handle_DATA(self, smtp_server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


async def wait_for(predicate, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def test_notices_reach_a_real_smtp_server_once_each(start):
    inbox = Inbox()
    smtp_port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        ledger = await start(smtp_url=f"smtp://127.0.0.1:{smtp_port}")
        tasks = server.start_background(ledger.settings, ledger.store, ledger.clock)
        try:
            await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_5", email="five@x.test"))
            # ref-chat-large: $15 per million output tokens, so 200,000 tokens cost $3 (held: 13
            # choices of 16,384, as a charge never exceeds its hold).
            for n in range(4):  # 10 -> 7 -> 4 (below $5) -> 1 -> -2 (at or below $0)
                hold_id, _ = await ledger.allow("acct_5", request_id=f"r{n}", model="ref-chat-large",
                                                max_tokens=16_384, n=13)
                await ledger.settle(hold_id, 0, 200_000, request_id=f"r{n}")
            await wait_for(lambda: len(inbox.messages) >= 2)
            await asyncio.sleep(0.3)  # nothing more may arrive
            assert [m["To"] for m in inbox.messages] == ["five@x.test", "five@x.test"]
            assert "below $5.00" in inbox.messages[0]["Subject"]
            assert "run out" in inbox.messages[1]["Subject"]
            assert "https://tokens.flex.ai/dashboard/billing" in inbox.messages[1].get_payload()
            denied = await ledger.check.Check(testing.check_request(testing.frame(testing.chat_request()),
                                                                    account_id="acct_5"))
            assert denied.denied_response.status.code == 402
            # A top-up arms both notices again.
            await ledger.ledger.Credit(ledger_pb2.CreditRequest(account_id="acct_5", amount_nanos=10 * USD,
                                                                transfer_id="pi_5", kind="payment"))
            for n in range(3):  # 8 -> 5 -> 2 (below) -> -1 (zero)
                hold_id, _ = await ledger.allow("acct_5", request_id=f"s{n}", model="ref-chat-large",
                                                max_tokens=16_384, n=13)
                await ledger.settle(hold_id, 0, 200_000, request_id=f"s{n}")
            await wait_for(lambda: len(inbox.messages) >= 4)
            await asyncio.sleep(0.3)
            assert len(inbox.messages) == 4
            stats = await ledger.ledger.GetJournalStats(ledger_pb2.GetJournalStatsRequest())
            assert stats.outbox_emails == 0
        finally:
            await server.stop_background(tasks)
    finally:
        controller.stop()


async def test_without_smtp_notices_are_eml_files(start, tmp_path):
    ledger = await start()
    sender = emails.Sender(ledger.store, emails.FileTransport(ledger.settings.emails_dir),
                           emails.Branding("billing@test", "https://example.test", 5 * USD), ledger.clock)
    await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_6", email="six@x.test"))
    hold_id, _ = await ledger.allow("acct_6", model="ref-chat-large", max_tokens=16_384, n=25)
    await ledger.settle(hold_id, 0, 400_000)  # -> $4 (held: 25 choices of 16,384 tokens)
    assert await sender.run_once() == 1
    [path] = list(ledger.settings.emails_dir.glob("*.eml"))
    message = email.message_from_bytes(path.read_bytes())
    assert message["To"] == "six@x.test" and "https://example.test/dashboard/billing" in message.get_payload()
    assert await sender.run_once() == 0


class FakeLago:
    """Records events by transaction_id; can fail, or lose its answer, like a real network."""

    def __init__(self) -> None:
        self.events: dict[str, dict] = {}
        self.batches: list[list[dict]] = []
        self.plan: list[str] = []  # per request: "ok", "fail" (500), "lost" (store, then 504)
        self.old_dedup = True  # answer repeats with 422 value_already_exist, as Lago before v1.20 did

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        assert request.headers["Authorization"] == "Bearer lago-key"
        events = (await request.json())["events"]
        self.batches.append(events)
        mode = self.plan.pop(0) if self.plan else "ok"
        if mode == "fail":
            return aiohttp.web.json_response({"status": 500}, status=500)
        repeats = {str(i): {"transaction_id": ["value_already_exist"]}
                   for i, e in enumerate(events) if e["transaction_id"] in self.events}
        if repeats and self.old_dedup:
            return aiohttp.web.json_response({"status": 422, "error": "Unprocessable Entity",
                                              "code": "validation_errors", "error_details": repeats}, status=422)
        for event in events:
            self.events.setdefault(event["transaction_id"], event)
        if mode == "lost":
            return aiohttp.web.json_response({"status": 504}, status=504)
        return aiohttp.web.json_response({"events": events})


async def test_settled_calls_are_exported_to_lago_once(start):
    lago = FakeLago()
    app = aiohttp.web.Application()
    app.router.add_post("/api/v1/events/batch", lago.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    lago_port = free_port()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", lago_port).start()
    try:
        ledger = await start(lago_api_url=f"http://127.0.0.1:{lago_port}", lago_api_key="lago-key")
        exporter = lago_client.Exporter(ledger.store, lago_client.LagoSettings(
            ledger.settings.lago_api_url, "lago-key", "api_call"), ledger.clock)
        try:
            await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_7"))
            costs = {}
            for n in range(3):
                hold_id, _ = await ledger.allow("acct_7", request_id=f"req-{n}")
                costs[f"req-{n}"] = (await ledger.settle(hold_id, 10 * (n + 1), 3, request_id=f"req-{n}")).cost_nanos
            lago.plan = ["fail", "lost"]
            assert await exporter.run_once() == 3  # 500: retried later
            assert lago.events == {}
            ledger.clock.advance(60_000)
            assert await exporter.run_once() == 3  # stored, but the answer was lost
            assert set(lago.events) == set(costs)
            ledger.clock.advance(60_000)
            hold_id, _ = await ledger.allow("acct_7", request_id="req-3")
            costs["req-3"] = (await ledger.settle(hold_id, 5, 5, request_id="req-3")).cost_nanos
            # The retry repeats three events Lago has (422 for them) beside one it has not.
            assert await exporter.run_once() == 4
            assert await exporter.run_once() == 1  # the new one, sent again on its own
            assert await exporter.run_once() == 0
        finally:
            await exporter.close()
        assert set(lago.events) == set(costs)
        event = lago.events["req-1"]
        assert (event["external_subscription_id"], event["code"]) == ("acct_7", "api_call")
        assert event["properties"]["model"] == "ref-chat" and event["properties"]["input_tokens"] == 20
        assert event["precise_total_amount_cents"] == lago_client.cents(costs["req-1"])
        assert lago_client.cents(1500) == "0.00015" and lago_client.cents(10_000_000) == "1"
        stats = await ledger.ledger.GetJournalStats(ledger_pb2.GetJournalStatsRequest())
        assert stats.outbox_lago == 0
    finally:
        await runner.cleanup()


def test_settings_defaults(monkeypatch, tmp_path):
    for name in ("TOKENS_SIGNUP_CREDIT_USD", "TOKENS_LOW_BALANCE_USD", "TOKENS_PUBLIC_BASE_URL", "TOKENS_SMTP_URL",
                 "TOKENS_HOLD_TTL_S", "TOKENS_HOLD_CLAIM_S", "TOKENS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENS_DATA_DIR", str(tmp_path))
    settings = config.Settings.from_env()
    assert config.SIGNUP_CREDIT_USD_DEFAULT == "10.00"
    assert (settings.signup_credit_nanos, settings.low_balance_nanos) == (10 * USD, 5 * USD)
    assert (settings.server.port, settings.hold_ttl_s, settings.hold_claim_s) == (50053, 900, 60)
    assert settings.database_url == f"sqlite:///{tmp_path / 'ledger.db'}"
    assert settings.insufficient_credit_body == BODY_402
    monkeypatch.setenv("TOKENS_SIGNUP_CREDIT_USD", "ten")
    with pytest.raises(SystemExit):
        config.Settings.from_env()
    monkeypatch.setenv("TOKENS_SIGNUP_CREDIT_USD", "2.50")
    monkeypatch.setenv("TOKENS_PUBLIC_BASE_URL", "https://example.test/")
    settings = config.Settings.from_env()
    assert settings.signup_credit_nanos == 2_500_000_000
    assert "https://example.test/dashboard/billing" in settings.insufficient_credit_body
    assert domain.SETTLEMENTS_MAX == 1000


async def test_content_parts_are_held_by_the_models_rules_and_unaccepted_ones_hold_nothing(start, tmp_path):
    """20 images hold 20 x tokens_each at the input price; a part the model does not accept
    is a 400 naming it, and nothing is held."""
    path = tmp_path / "parts-catalog.yaml"
    path.write_text(testing.CATALOG_YAML.replace(
        "    limits: {context_window: 32768, max_output_tokens: 4096}\n",
        "    limits: {context_window: 32768, max_output_tokens: 4096}\n"
        "    inputs: {image_url: {tokens_each: 1445}}\n", 1))
    ledger = await start(catalog_path=path)
    await ledger.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id="acct_p"))
    image = {"type": "image_url", "image_url": {"url": "https://cdn.example.com/cat.png"}}

    def request(model: str, parts: list) -> bytes:
        body = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": parts}]}
        return testing.frame(json_format.ParseDict(body, router_pb2.CreateChatCompletionRequest()))

    answer = await ledger.check.Check(testing.check_request(request("ref-chat", [image] * 20), account_id="acct_p"))
    assert answer.HasField("ok_response"), answer
    prices = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}
    worst = pricing.cost_nanos(prices, {"input_tokens": 20 * 1445 + 8 + 8, "output_tokens": 10})
    balance = await ledger.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id="acct_p"))
    assert balance.held_nanos == worst == 14_473_000

    for model, parts, param in [
            ("ref-chat-large", [{"type": "text", "text": "hi"}, image], "messages[0].content[1]"),
            ("ref-chat", [image, {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
             "messages[0].content[1]"),
            ("ref-chat", [{"type": "video_url", "video_url": {"url": "https://x.example.com/v.mp4"}}],
             "messages[0].content[0]")]:
        refused = await ledger.check.Check(testing.check_request(request(model, parts), account_id="acct_p"))
        assert refused.denied_response.status.code == 400, refused
        error = json.loads(refused.denied_response.body)["error"]
        assert (error["param"], error["code"]) == (param, "unsupported_content_part"), error
    after = await ledger.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id="acct_p"))
    assert after.held_nanos == worst  # the refusals held nothing
