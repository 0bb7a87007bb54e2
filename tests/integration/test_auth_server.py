"""auth_svc built with build_server on port 0, called through its real stubs,
with a small fake ledger_svc (a real gRPC server) behind it."""
import json

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2

from tests.integration import auth_rig
from tokens.auth.v1 import auth_pb2

PASSWORD = auth_rig.PASSWORD


@pytest.fixture
async def auth(db_target):
    async with auth_rig.serving(db_target) as serving:
        yield serving


def as_account(account_id: str, kind: str = "session"):
    return (("x-ts-auth", kind), ("x-ts-account", account_id))


def check_request(headers: dict, policy: str = "key", path="/v1/chat/completions"):
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "POST", path
    http.headers.update(headers)
    request.attributes.context_extensions["auth"] = policy
    return request


def error_of(exc: grpc.aio.AioRpcError) -> dict:
    return json.loads(exc.details())["error"]


async def signup(auth, email="someone@example.com"):
    return await auth["accounts"].CreateAccount(auth_pb2.CreateAccountRequest(email=email, password=PASSWORD))


async def test_signup_returns_account_and_a_working_key(auth):
    reply = await signup(auth)
    assert reply.account.id.startswith("acct_")
    assert reply.account.balance_usd == "10.00"
    assert reply.api_key.startswith("tsk_") and reply.key.tier == "free"
    assert auth["ledger"].opened == [reply.account.id]
    check = await auth["check"].Check(check_request({"authorization": f"Bearer {reply.api_key}"}))
    assert check.HasField("ok_response")
    trusted = {h.header.key: h.header.value for h in check.ok_response.headers}
    assert trusted == {"x-ts-auth": "key", "x-ts-account": reply.account.id, "x-ts-key": reply.key.id,
                       "x-ts-tier": "free"}


@pytest.mark.parametrize("email,password,param", [
    ("not-an-email", PASSWORD, "email"),
    ("", PASSWORD, "email"),
    ("a@example.com", "short", "password"),
    ("a@example.com", "password123", "password"),
    ("a@example.com", "aaaaaaaaaaaaaa", "password"),
    ("a@example.com", "", "password"),
])
async def test_signup_refuses_bad_input_and_creates_nothing(auth, email, password, param):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auth["accounts"].CreateAccount(auth_pb2.CreateAccountRequest(email=email, password=password))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(caught.value)["param"] == param
    assert auth["ledger"].opened == []


async def test_duplicate_email_is_a_conflict(auth):
    await signup(auth, "Dup@Example.com")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await signup(auth, "Dup@example.COM")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_of(caught.value)["code"] == "email_taken"


async def test_signup_during_ledger_outage_is_503_then_resumes(auth):
    auth["ledger"].fail = True
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await signup(auth, "later@example.com")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Not half-made: the account cannot be used while pending.
    with pytest.raises(grpc.aio.AioRpcError) as login:
        await auth["accounts"].CreateSession(auth_pb2.CreateSessionRequest(email="later@example.com",
                                                                           password=PASSWORD))
    assert login.value.code() == grpc.StatusCode.UNAUTHENTICATED
    auth["ledger"].fail = False
    reply = await signup(auth, "later@example.com")
    assert reply.api_key and auth["ledger"].opened == [reply.account.id]


async def test_reconciler_finishes_a_pending_signup(auth):
    auth["ledger"].fail = True
    with pytest.raises(grpc.aio.AioRpcError):
        await signup(auth, "crash@example.com")
    auth["ledger"].fail = False
    auth["state"].clock = lambda: 2_000_000_000  # much later: the pending row is old enough
    await auth["state"].reconcile()
    session = await auth["accounts"].CreateSession(auth_pb2.CreateSessionRequest(email="crash@example.com",
                                                                                 password=PASSWORD))
    assert session.account.status == "active"


async def test_sessions_and_key_management(auth):
    reply = await signup(auth)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auth["accounts"].CreateSession(auth_pb2.CreateSessionRequest(email=reply.account.email,
                                                                           password="wrong password!!"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    session = await auth["accounts"].CreateSession(auth_pb2.CreateSessionRequest(email=reply.account.email,
                                                                                 password=PASSWORD))
    assert session.session_token.startswith("tss_")
    check = await auth["check"].Check(check_request({"cookie": f"a=b; ts_session={session.session_token}",
                                                     "content-type": "application/json"}, "any"))
    trusted = {h.header.key: h.header.value for h in check.ok_response.headers}
    assert trusted["x-ts-auth"] == "session" and trusted["x-ts-account"] == reply.account.id
    # A session is not an API key.
    denied = await auth["check"].Check(check_request({"authorization": f"Bearer {session.session_token}"}))
    assert denied.denied_response.status.code == 401

    md = as_account(reply.account.id)
    created = await auth["accounts"].CreateKey(auth_pb2.CreateKeyRequest(name="ci"), metadata=md)
    assert created.secret.startswith("tsk_") and created.key.name == "ci"
    listed = await auth["accounts"].ListKeys(auth_pb2.ListKeysRequest(), metadata=md)
    assert sorted(k.name for k in listed.data) == ["ci", "default"]
    assert all(created.secret not in str(k) for k in listed.data)
    await auth["accounts"].RevokeKey(auth_pb2.RevokeKeyRequest(key_id=created.key.id), metadata=md)
    denied = await auth["check"].Check(check_request({"authorization": f"Bearer {created.secret}"}))
    assert denied.denied_response.status.code == 401
    assert json.loads(denied.denied_response.body)["error"]["code"] == "invalid_api_key"


async def test_keys_of_another_account_cannot_be_revoked(auth):
    one = await signup(auth, "one@example.com")
    two = await signup(auth, "two@example.com")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auth["accounts"].RevokeKey(auth_pb2.RevokeKeyRequest(key_id=two.key.id),
                                         metadata=as_account(one.account.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_check_policies_and_header_stripping(auth):
    reply = await signup(auth)
    spoofed = {"authorization": f"Bearer {reply.api_key}", "x-ts-account": "acct_victim", "x-ts-tier": "paid",
               "x-ts-hold": "someone-elses-hold", "x-ts-anything": "1"}
    check = await auth["check"].Check(check_request(spoofed))
    trusted = {h.header.key: h.header.value for h in check.ok_response.headers}
    assert trusted["x-ts-account"] == reply.account.id and trusted["x-ts-tier"] == "free"
    assert set(check.ok_response.headers_to_remove) == {"x-ts-hold", "x-ts-anything"}

    public = await auth["check"].Check(check_request({"x-ts-account": "acct_victim"}, "public", "/v1/accounts"))
    assert {h.header.key: h.header.value for h in public.ok_response.headers} == {"x-ts-auth": "none"}
    assert list(public.ok_response.headers_to_remove) == ["x-ts-account"]

    missing = await auth["check"].Check(check_request({}))
    assert missing.denied_response.status.code == 401
    assert json.loads(missing.denied_response.body)["error"]["type"] == "invalid_request_error"
    optional = await auth["check"].Check(check_request({}, "optional", "/nowhere"))
    assert optional.HasField("ok_response")

    # A typo fails the checksum: refused before any lookup.
    typo = reply.api_key[:-1] + ("A" if reply.api_key[-1] != "A" else "B")
    bad = await auth["check"].Check(check_request({"authorization": f"Bearer {typo}"}))
    assert bad.denied_response.status.code == 401
    grpc_bad = await auth["check"].Check(check_request({"authorization": "Bearer nope",
                                                        "content-type": "application/grpc"}))
    assert {h.header.key: h.header.value for h in grpc_bad.denied_response.headers}["grpc-status"] == "16"


async def test_admin_tier_and_revoke_apply_to_the_next_check(auth):
    reply = await signup(auth)
    headers = {"authorization": f"Bearer {reply.api_key}"}
    await auth["admin"].SetKeyTier(auth_pb2.SetKeyTierRequest(key_id=reply.key.id, tier="elevated"))
    check = await auth["check"].Check(check_request(headers))
    assert {h.header.key: h.header.value for h in check.ok_response.headers}["x-ts-tier"] == "elevated"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auth["admin"].SetKeyTier(auth_pb2.SetKeyTierRequest(key_id=reply.key.id, tier="platinum"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = await auth["admin"].LookupAccount(auth_pb2.LookupAccountRequest(query=reply.key.id))
    assert found.account.id == reply.account.id and found.keys[0].tier == "elevated"
    await auth["admin"].RevokeKey(auth_pb2.AdminRevokeKeyRequest(key_id=reply.key.id))
    check = await auth["check"].Check(check_request(headers))
    assert check.denied_response.status.code == 401


async def test_upgrade_requests_are_listed_and_approved(auth):
    reply = await signup(auth)
    md = as_account(reply.account.id)
    first = await auth["accounts"].CreateUpgradeRequest(auth_pb2.CreateUpgradeRequestRequest(reason="eval"),
                                                        metadata=md)
    again = await auth["accounts"].CreateUpgradeRequest(auth_pb2.CreateUpgradeRequestRequest(), metadata=md)
    assert again.id == first.id and first.status == "pending"
    pending = await auth["admin"].ListUpgradeRequests(auth_pb2.ListUpgradeRequestsRequest())
    assert [r.id for r in pending.data] == [first.id]
    decided = await auth["admin"].DecideUpgradeRequest(auth_pb2.DecideUpgradeRequestRequest(id=first.id,
                                                                                           approve=True))
    assert decided.status == "approved"
    keys = await auth["accounts"].ListKeys(auth_pb2.ListKeysRequest(), metadata=md)
    assert {k.tier for k in keys.data} == {"elevated"}
