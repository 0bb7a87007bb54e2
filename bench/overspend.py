"""What uncapped calls cost when the backend ignores the cap: one call, then a burst.

    ./dev bench overspend [--calls 40] [--keys 4]

Starts a mesh whose reference backend lies (TOKENS_BACKEND_MISBEHAVE): it ignores
max_tokens and writes the 100,000 tokens the prompt asks for, and reports them.
Then, on ref-chat-large (16,384 output tokens at most, $15 per million):

1. one non-streamed chat call without max_tokens: what the backend was sent as
   its cap, the tokens it reported, what the call was charged, and the worst case
   ledger_svc held for it;
2. a fresh account ($10 of signup credit, Paid tier so that no rate limit
   interferes) makes --calls such calls at once over --keys keys: how many ran,
   how many were refused (402), and the balance once every call has settled,
   against the promise "below zero by at most one call's worst case".

The load is --calls (at most 100) calls to 127.0.0.1, each within CALL_TIMEOUT_S.
"""
import argparse
import asyncio
import contextlib
import fractions
import io
import os
import sys
import time
import uuid

import httpx

from bench import harness
from common import money
from devtool import admin as admin_cli

MODEL = "ref-chat-large"
CALLS_MAX = 100
CALL_TIMEOUT_S = 60.0
PASSWORD = "overspend passphrase!"
CONTENT = "[[ignore_max_tokens]] [[tokens=100000]] Write a very long story."
# ledger_svc's worst case for one message: its UTF-8 bytes + 8 per message + 8 as input tokens.
INPUT_FRAMING = 16


def body() -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": CONTENT}]}


def worst_nanos(prices_usd: dict[str, str], output_cap: int) -> int:
    """The hold of one such call, computed here on its own from the public prices."""
    input_tokens = len(CONTENT.encode()) + INPUT_FRAMING
    exact = (fractions.Fraction(input_tokens * money.parse_usd(prices_usd["input_per_million_tokens"]), 10**6)
             + fractions.Fraction(output_cap * money.parse_usd(prices_usd["output_per_million_tokens"]), 10**6))
    return int(exact + fractions.Fraction(1, 2))


def admin(mesh, *argv: str) -> None:
    os.environ["TOKENS_DATA_DIR"] = str(mesh.config.data_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        assert admin_cli.main(list(argv)) == 0, argv


def open_account(mesh, keys: int) -> tuple[str, list[str]]:
    """A fresh account on the Paid tier: (account id, `keys` API keys)."""
    base = mesh.config.base_url
    email = f"overspend-{uuid.uuid4().hex[:8]}@example.com"
    signup = httpx.post(f"{base}/v1/accounts", json={"email": email, "password": PASSWORD}, timeout=30).json()
    account_id = signup["account"]["id"]
    admin(mesh, "account-tier", account_id, "paid")
    session = httpx.post(f"{base}/v1/sessions", json={"email": email, "password": PASSWORD}, timeout=30).json()
    auth = {"Authorization": f"Bearer {session['session_token']}"}
    secrets = [signup["api_key"]]
    while len(secrets) < keys:
        reply = httpx.post(f"{base}/v1/keys", headers=auth, json={"name": "overspend"}, timeout=30)
        secrets.append(reply.json()["secret"])
    return account_id, secrets


def settled_balance(base: str, key: str) -> dict:
    """The account once nothing is held any more (settlements are batched: a moment)."""
    deadline = time.monotonic() + 30
    while True:
        account = httpx.get(f"{base}/v1/account", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
        if account["available_usd"] == account["balance_usd"] or time.monotonic() > deadline:
            return account
        time.sleep(0.2)


async def burst(base: str, keys: list[str], calls: int) -> dict[int, int]:
    limits = httpx.Limits(max_connections=calls)
    async with httpx.AsyncClient(base_url=base, timeout=CALL_TIMEOUT_S, limits=limits) as client:
        async def one(i: int) -> int:
            reply = await client.post("/v1/chat/completions", json=body(),
                                      headers={"Authorization": f"Bearer {keys[i % len(keys)]}"})
            return reply.status_code

        statuses = await asyncio.gather(*(one(i) for i in range(calls)))
    counts: dict[int, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return dict(sorted(counts.items()))


def one_call(mesh, key: str) -> None:
    base = mesh.config.base_url
    backend = f"http://127.0.0.1:{mesh.config.backend_port}"
    httpx.delete(f"{backend}/_requests", timeout=10)
    reply = httpx.post(f"{base}/v1/chat/completions", json=body(), headers={"Authorization": f"Bearer {key}"},
                       timeout=CALL_TIMEOUT_S)
    reply.raise_for_status()
    usage = reply.json()["usage"]
    words = len(reply.json()["choices"][0]["message"]["content"].split())
    [sent] = httpx.get(f"{backend}/_requests", timeout=10).json()["data"]
    cap = {k: v for k, v in sent["body"].items() if k in ("max_tokens", "max_completion_tokens")} or "no cap"
    model = httpx.get(f"{base}/v1/models/{MODEL}", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    held = worst_nanos(model["pricing"], model["limits"]["max_output_tokens"])
    print(f"1. one call on {MODEL} without max_tokens: the backend was sent {cap}; it wrote {words} tokens; "
          f"charged ${usage['cost']} for {usage['completion_tokens']} completion tokens "
          f"(+{usage['prompt_tokens']} prompt); held ${money.usd(held)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench overspend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=40, help=f"parallel calls of the burst (1..{CALLS_MAX})")
    parser.add_argument("--keys", type=int, default=4, help="keys of the account the burst is spread over")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.calls <= CALLS_MAX or not 1 <= args.keys <= 10:
        parser.error(f"--calls must be 1..{CALLS_MAX}, --keys 1..10")
    env = {"reference": {"TOKENS_BACKEND_MISBEHAVE": "1", "TOKENS_BACKEND_RECORD_REQUESTS": "1"}}
    with harness.mesh(env_of=env, baseline_port=None) as mesh:
        _account, [key] = open_account(mesh, 1)
        one_call(mesh, key)
        account_id, keys = open_account(mesh, args.keys)
        started = time.monotonic()
        counts = asyncio.run(burst(mesh.config.base_url, keys, args.calls))
        took_s = time.monotonic() - started
        account = settled_balance(mesh.config.base_url, keys[0])
        model = httpx.get(f"{mesh.config.base_url}/v1/models/{MODEL}", headers={"Authorization": f"Bearer {keys[0]}"},
                          timeout=10).json()
        worst = worst_nanos(model["pricing"], model["limits"]["max_output_tokens"])
    print(f"2. a fresh $10 account, {args.calls} such calls at once over {args.keys} keys: statuses {counts}, "
          f"in {took_s:.1f} s; balance afterwards ${account['balance_usd']} "
          f"(the floor, minus one call's worst case: -${money.usd(worst)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
