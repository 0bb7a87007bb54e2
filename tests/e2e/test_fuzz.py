"""Hypothesis against the public API through Envoy: generated bodies, headers,
methods and paths. Whatever arrives, the gateway answers with a documented
status in OpenAI's error shape, never a 5xx on a healthy mesh, and a refused
call never changes the balance."""
import json
import os
import string
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from devtool import admin
from tests.e2e.conftest import PASSWORD, signup

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/ref-chat", "/v1/account",
         "/v1/keys", "/v1/keys/key_nothing", "/v1/usage", "/v1/tiers", "/v1/accounts", "/v1/sessions",
         "/v1/upgrade-requests", "/v1/nothing", "/", "/v2/chat/completions", "/v1/chat/completions/extra",
         "/tokens.router.v1.Inference/Chat"]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "n",
          "temperature", "top_p", "stop", "prompt", "seed", "user", "tools", "logit_bias", "role", "content",
          "email", "password", "name", "tier", "reason"]
json_leaf = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, width=32) \
    | st.text(max_size=30) | st.sampled_from(["ref-chat", "user", "assistant", "", "[[tokens=2]]"])
json_value = st.recursive(json_leaf, lambda children: st.lists(children, max_size=4)
                          | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=5),
                          max_leaves=12)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=8).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda m, n: json.dumps({"model": m, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": n}).encode(),
              st.sampled_from(["ref-chat", "ref-instruct", "nope", ""]), st.integers(-5, 5000)),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode))
header_names = st.sampled_from(["x-ts-account", "x-ts-tier", "x-ts-hold", "x-ts-price", "x-ts-internal",
                                "content-type", "accept", "x-request-id", "cookie", "x-custom"])
# HTTP clients refuse values with leading or trailing spaces before sending them.
header_values = st.text(alphabet=string.ascii_letters + string.digits + " ;=/-_.", max_size=40).map(str.strip)
ALLOWED = {200, 400, 401, 402, 403, 404, 405, 409, 413, 415, 429}


@pytest.fixture(scope="module")
def fuzz_account(mesh, base_url):
    customer = signup(base_url)
    os.environ["TOKENS_DATA_DIR"] = str(mesh.config.data_dir)
    admin.main(["account-tier", customer.account_id, "paid"])
    session = httpx.post(f"{base_url}/v1/sessions", json={"email": customer.email, "password": PASSWORD}).json()
    bearer = {"Authorization": f"Bearer {session['session_token']}"}
    keys = [customer.api_key]
    for index in range(4):
        keys.append(httpx.post(f"{base_url}/v1/keys", headers=bearer, json={"name": f"fuzz{index}"}).json()["secret"])
    reader = {"Authorization": f"Bearer {keys.pop()}"}
    return {"keys": keys, "session": bearer, "reader": reader, "count": [0]}


def settled_balance(base_url: str, reader: dict) -> str:
    """The balance once no call holds anything (earlier calls have settled)."""
    for _ in range(200):
        account = httpx.get(f"{base_url}/v1/account", headers=reader).json()
        if account["held_usd"] in ("0.00", "0"):
            return account["balance_usd"]
        time.sleep(0.02)
    raise AssertionError(f"holds never settled: {account}")


def check_shape(reply: httpx.Response) -> None:
    assert reply.status_code in ALLOWED, (reply.status_code, reply.text[:300])
    if reply.status_code == 200:
        return
    assert reply.headers.get("content-type", "").startswith("application/json"), (reply.status_code, reply.headers)
    body = reply.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    assert {"message", "type", "code"} <= set(body["error"]), body


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]), path=st.sampled_from(PATHS),
       body=bodies, extra=st.dictionaries(header_names, header_values, max_size=3),
       credential=st.sampled_from(["key", "none", "bad", "session"]))
def test_whatever_arrives_gets_a_documented_answer(base_url, fuzz_account, method, path, body, extra, credential):
    account = fuzz_account
    account["count"][0] += 1
    headers = dict(extra)
    if credential == "key":
        headers["Authorization"] = f"Bearer {account['keys'][account['count'][0] % len(account['keys'])]}"
    elif credential == "bad":
        headers["Authorization"] = "Bearer tsk_" + "x" * 38
    elif credential == "session":
        headers.update(account["session"])
    # Read with a key of its own: the dashboard session's calls have a per-minute limit, and 120
    # examples of two reads each would pass it (its 429 is a documented answer, not a balance).
    before = settled_balance(base_url, account["reader"])
    try:
        reply = httpx.request(method, base_url + path, content=body if method != "GET" else None,
                              headers=headers, timeout=30)
    except httpx.RemoteProtocolError as error:
        pytest.fail(f"the gateway dropped the connection: {error}")
    check_shape(reply)
    if reply.status_code != 200:
        assert settled_balance(base_url, account["reader"]) == before, (method, path, reply.status_code)


@settings(max_examples=40, deadline=None)
@given(path=st.text(alphabet=string.ascii_letters + string.digits + "/._-%~", min_size=1, max_size=60))
def test_generated_paths_are_404_or_known(base_url, path):
    reply = httpx.get(f"{base_url}/{path.lstrip('/')}", timeout=30)
    assert reply.status_code in {200, 400, 401, 404, 405}, (path, reply.status_code, reply.text[:200])
    if reply.status_code != 200:
        assert reply.json()["error"]["message"]
