"""Whatever a backend does, a call is charged at most what was held, and the journal balances.

Hypothesis plays a backend: a unary answer with any usage and any number of choices, or a
stream of any events (output or empty deltas, for choices asked for or not, finished or
not, with any usage report, true or not), cut at any point by a client that leaves. The
call goes the whole way without a network: ledger_svc's worst case and hold
(ledger_svc.check, domain.Book) and its x-ts-held header (common.held), router_svc's caps
and cut (router_svc.meter), then the settlement posted in the same Book.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import held, pricing
from ledger_svc import check, domain
from router_svc import meter

pytestmark = pytest.mark.timeout(300)

USD = 1_000_000_000
TOKENS_MAX = 10**7

prices_strategy = st.fixed_dictionaries({
    "input_per_million_tokens": st.integers(0, 20 * USD),
    "output_per_million_tokens": st.integers(0, 80 * USD)})
usage_strategy = st.one_of(st.none(), st.fixed_dictionaries({
    "prompt_tokens": st.one_of(st.integers(0, TOKENS_MAX), st.just(-3), st.just("many"), st.floats()),
    "completion_tokens": st.one_of(st.integers(0, TOKENS_MAX), st.just(-3), st.none(), st.floats())}))


@st.composite
def calls(draw):
    """(prices, model limits, the request's output fields, its input size, its choices)."""
    # Small caps too, so that streams of a few dozen events run into them.
    cap = draw(st.one_of(st.integers(1, 8), st.integers(1, 4096)))
    n = draw(st.integers(1, 4))
    requested = draw(st.one_of(st.none(), st.integers(1, min(cap, 8)), st.integers(1, cap)))
    return draw(prices_strategy), {"max_output_tokens": cap}, requested, draw(st.integers(0, 5000)), n


@st.composite
def events(draw, n: int):
    """A stream as a backend might send it: each event is one choice's chunk, maybe with usage."""
    out = []
    for _ in range(draw(st.integers(0, 60))):
        choice = {"index": draw(st.integers(0, n + 1))}
        kind = draw(st.sampled_from(["text", "empty", "tool", "finish"]))
        choice["delta"] = {"text": {"content": "w"}, "empty": {}, "tool": {"tool_calls": [{"index": 0}]},
                           "finish": {}}[kind]
        choice["finish_reason"] = draw(st.sampled_from(["stop", "length"])) if kind == "finish" else None
        event = {"id": "c", "choices": [choice]}
        usage = draw(usage_strategy)
        if usage is not None:
            event["usage"] = usage
        out.append(event)
    return out


def journal(prices: dict, units: domain.Units) -> tuple[domain.Book, domain.HoldDecision]:
    accounts = {"acct": domain.Account("acct")}
    book = domain.Book(accounts, {}, domain.Policy(low_balance_nanos=5 * USD, hold_ttl_ms=900_000))
    book.post_transfer(domain.signup_grant("acct", 10 * USD, 0), None)
    decision = book.hold(domain.HoldRequest("h", "acct", "k", "m", "r", prices, 1,
                                            domain.worst_cost_nanos(prices, units)), 0)
    assert decision.result is domain.HoldResult.ADMITTED
    return book, decision


def settle_and_check(book: domain.Book, prices: dict, input_tokens: int, output_tokens: int, outcome: str) -> None:
    hold = book.holds["h"]
    charged = pricing.cost_nanos(prices, {"input_tokens": input_tokens, "output_tokens": output_tokens})
    assert charged <= hold.amount_nanos, "router_svc charges no more than the hold"
    result = book.settle(domain.Settlement("h", domain.Units(input_tokens, output_tokens), outcome, "r", 1), 1)
    assert result.status is domain.SettleStatus.POSTED and not result.capped
    assert result.cost_nanos == charged <= hold.amount_nanos
    book.assert_balanced()
    accounts = book.accounts.values()
    assert sum(a.balance_nanos for a in accounts) == 0, "debits == credits"
    assert sum(a.debits_pending for a in accounts) == sum(a.credits_pending for a in accounts) == 0


def held_call(prices, limits, requested, text_bytes, n):
    """The ledger's hold of a one-message chat call, and router_svc's caps from its header."""
    call = domain.TextCall(model="m", text_bytes=text_bytes, segments=1, choices=n, max_tokens=requested)
    units = domain.worst_text_units(call, limits)
    header = check.held_header("m", "text", units)
    caps = meter.caps(held.Held.parse(header), "m", requested, limits["max_output_tokens"], n, n)
    assert caps.per_choice * n <= units.output_tokens, "the backend is never asked for more than was held"
    return units, caps


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls(), data=st.data())
def test_a_stream_is_charged_at_most_its_hold(call, data):
    prices, limits, requested, text_bytes, n = call
    units, caps = held_call(prices, limits, requested, text_bytes, n)
    book, _ = journal(prices, units)
    stream = data.draw(events(n))
    left_at = data.draw(st.integers(0, len(stream)))  # the client leaves after this many events
    metering = meter.StreamMeter(caps)
    forwarded: dict[int, int] = {}
    for event in stream[:left_at]:
        forward, _cut = metering.take(event)
        for choice in (forward or {}).get("choices", ()):
            assert 0 <= choice["index"] < n, "only the choices asked for reach the client"
            if choice["delta"]:
                forwarded[choice["index"]] = forwarded.get(choice["index"], 0) + 1
        if metering.done:
            break
    assert all(count <= caps.per_choice for count in forwarded.values()), "no choice past its cap"
    input_tokens, output_tokens, _over = metering.charge()
    settle_and_check(book, prices, input_tokens, output_tokens, domain.ABORTED if left_at < len(stream)
                     else domain.COMPLETED)


@settings(max_examples=300, deadline=None)
@given(call=calls(), usage=usage_strategy, returned=st.integers(0, 12))
def test_a_unary_answer_is_charged_at_most_its_hold(call, usage, returned):
    prices, limits, requested, text_bytes, n = call
    units, caps = held_call(prices, limits, requested, text_bytes, n)
    book, _ = journal(prices, units)
    answer = {"choices": [{"index": i} for i in range(returned)], "usage": usage}
    input_tokens, output_tokens, _over = meter.unary(caps, answer)
    assert len(answer["choices"]) == min(returned, n)
    settle_and_check(book, prices, input_tokens, output_tokens, domain.COMPLETED)


@settings(max_examples=200, deadline=None)
@given(prices=prices_strategy, amount=st.integers(0, 10 * USD),
       reported=st.tuples(st.integers(0, 10**9), st.integers(0, 10**9)))
def test_the_ledger_itself_never_posts_more_than_a_hold(prices, amount, reported):
    """Defence in depth: a settlement from a router that did not cut is cut by the ledger."""
    accounts = {"acct": domain.Account("acct")}
    book = domain.Book(accounts, {}, domain.Policy(low_balance_nanos=5 * USD, hold_ttl_ms=900_000))
    book.post_transfer(domain.signup_grant("acct", 10 * USD, 0), None)
    book.hold(domain.HoldRequest("h", "acct", "k", "m", "r", prices, 1, amount), 0)
    result = book.settle(domain.Settlement("h", domain.Units(*reported), domain.COMPLETED, "r", 1), 1)
    [row] = book.usage
    assert result.cost_nanos == row.cost_nanos <= amount
    assert pricing.cost_nanos(prices, row.units.as_usage()) == row.cost_nanos, "units x price = debit"
    assert row.units.input_tokens <= reported[0] and row.units.output_tokens <= reported[1]
    book.assert_balanced()
    assert sum(a.balance_nanos for a in book.accounts.values()) == 0
