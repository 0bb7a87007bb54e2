"""docs/pricing-and-limits.md is generated from the code that holds each fact, and the committed
page matches it; `./dev docs --check` (run by CI before the tests) fails when it does not."""
import dataclasses
import json

import pytest

from devtool import docs
from ledger_svc import billing, config as ledger_config
from ratelimit_svc import tiers


def test_the_committed_page_is_the_generated_one():
    assert docs.PAGE.read_text() == docs.render()
    assert docs.main(["--check"]) == 0


def test_a_changed_tier_makes_the_check_fail(monkeypatch, capsys):
    faster = dataclasses.replace(tiers.PAID, requests_per_minute=301)
    monkeypatch.setattr(tiers, "TIERS", (tiers.FREE, tiers.ELEVATED, faster))
    monkeypatch.setattr(tiers, "_BY_NAME", {tier.name: tier for tier in tiers.TIERS})
    assert "| Paid | 301 |" in docs.render()
    assert docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "stale: run ./dev docs" in err and "+| Paid | 301 |" in err and "-| Paid | 300 |" in err, err


@pytest.mark.parametrize("module, name, value, shown", [
    (ledger_config, "SIGNUP_CREDIT_USD_DEFAULT", "25.00", "granted $25 of free credit"),
    (ledger_config, "LOW_BALANCE_USD_DEFAULT", "2.50", "drops below $2.50"),
    (billing, "TOPUP_MIN_USD", "10.00", "any amount ≥ $10"),
])
def test_each_fact_follows_its_source(monkeypatch, module, name, value, shown):
    monkeypatch.setattr(module, name, value)
    assert shown in docs.render()
    assert docs.main(["--check"]) == 1


def test_the_page_states_every_fact_of_the_public_page():
    page = docs.render()
    assert "granted $10 of free credit on signup" in page
    assert "| Free (default on signup) | 10 |" in page
    assert "| Elevated (approved users) | 60 |" in page
    assert "| Paid | 300 |" in page
    assert "| Free (default on signup) | 3 | 30 |" in page and "| Paid | 50 | 15,000 |" in page
    assert "| Accounts created | 5 per client address in an hour |" in page
    assert "| Failed logins | 10 per email in 15 minutes |" in page
    assert "$1,000 per account in any 24 hours" in page
    assert "`email_not_verified`" in page
    # The 402 body, exactly as the ledger sends it.
    body = ledger_config.insufficient_credit_body(ledger_config.PUBLIC_BASE_URL_DEFAULT)
    assert f"```json\n{body}\n```" in page
    assert json.loads(body) == {"error": {
        "message": "Insufficient credit. Add funds at https://tokens.flex.ai/dashboard/billing to continue.",
        "type": "insufficient_quota", "code": "402"}}
    assert "Top up by any amount ≥ $5" in page
    assert "drops below $5 and again when it hits $0" in page
    for header in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"):
        assert f"`{header}`" in page
    assert "Per million input tokens, per million output tokens." in page
    assert "| `ref-chat` | Text | $0.50 per million input tokens, $1.50 per million output tokens |" in page
    # It names the files it follows.
    for source in docs.SOURCES:
        assert f"`{source}`" in page


def test_a_unit_the_page_cannot_describe_stops_the_generator(monkeypatch):
    monkeypatch.setitem(docs.catalog.TYPE_UNITS, "music", ("per_song",))
    with pytest.raises(SystemExit, match="does not know how to describe music"):
        docs.render()
