"""auth_svc built with build_server on port 0, called through its real stubs,
with a small fake ledger_svc (a real gRPC server) behind it."""
import asyncio
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


# Verification, unique addresses, the limits on clients, and keys by tier.

def spend_check(secret: str):
    request = check_request({"authorization": f"Bearer {secret}"})
    request.attributes.context_extensions["verified"] = "required"
    return request


async def test_a_signup_is_verified_by_its_link_before_its_keys_spend(auth):
    reply = await signup(auth, "new@example.com")
    assert not reply.account.email_verified
    # The ledger holds no address for notices until it is verified; the link went to it alone.
    assert auth["ledger"].addresses[reply.account.id] == ""
    [link] = auth["ledger"].links("new@example.com")
    denied = await auth["check"].Check(spend_check(reply.api_key))
    assert denied.denied_response.status.code == 403
    assert json.loads(denied.denied_response.body)["error"]["code"] == "email_not_verified"
    reading = await auth["check"].Check(check_request({"authorization": f"Bearer {reply.api_key}"}, "any"))
    assert reading.HasField("ok_response")  # reading the account is fine
    token = auth_rig.verify_token(link)
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await auth["accounts"].VerifyEmail(auth_pb2.VerifyEmailRequest(token=tampered))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    done = await auth["accounts"].VerifyEmail(auth_pb2.VerifyEmailRequest(token=auth_rig.verify_token(link)))
    assert done.email_verified and done.email == "new@example.com"
    assert auth["ledger"].addresses[reply.account.id] == "new@example.com"
    assert (await auth["check"].Check(spend_check(reply.api_key))).HasField("ok_response")
    with pytest.raises(grpc.aio.AioRpcError) as spent:  # a link works once
        await auth["accounts"].VerifyEmail(auth_pb2.VerifyEmailRequest(token=auth_rig.verify_token(link)))
    assert error_of(spent.value)["code"] == "invalid_verification_link"


async def test_an_operator_verifies_and_resends_are_limited(auth):
    reply = await signup(auth, "slow@example.com")
    md = as_account(reply.account.id)
    for _ in range(3):
        sent = await auth["accounts"].ResendVerification(auth_pb2.ResendVerificationRequest(), metadata=md)
        assert sent.sent_to == "slow@example.com"
    with pytest.raises(grpc.aio.AioRpcError) as throttled:
        await auth["accounts"].ResendVerification(auth_pb2.ResendVerificationRequest(), metadata=md)
    assert throttled.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(throttled.value.initial_metadata())["retry-after"]) > 0
    assert len(auth["ledger"].links("slow@example.com")) == 4  # the signup's and three resends
    account = await auth["admin"].VerifyEmail(auth_pb2.AdminVerifyEmailRequest(query="SLOW@example.com"))
    assert account.email_verified and auth["ledger"].addresses[reply.account.id] == "slow@example.com"
    with pytest.raises(grpc.aio.AioRpcError) as already:
        await auth["accounts"].ResendVerification(auth_pb2.ResendVerificationRequest(), metadata=md)
    assert error_of(already.value)["code"] == "already_verified"


@pytest.mark.parametrize("rule,second,taken", [
    ("same", "ALICE@example.com", True),
    ("same", "alice+farm@Example.com", True),
    ("distinct", "Alice@EXAMPLE.com", True),
    ("distinct", "alice+work@example.com", False),
])
async def test_one_address_is_one_account(db_target, rule, second, taken):
    async with auth_rig.serving(db_target, email_plus_tags=rule) as served:
        await signup(served, "alice@example.com")
        if taken:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await signup(served, second)
            assert error_of(caught.value)["code"] == "email_taken"
            assert len(served["ledger"].opened) == 1
        else:
            assert (await signup(served, second)).account.email == second


async def test_failed_logins_are_limited_and_then_the_right_password_is_refused_too(db_target):
    async with auth_rig.serving(db_target) as served:
        reply = await signup(served, "victim@example.com")
        login = served["accounts"].CreateSession
        for _ in range(10):
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await login(auth_pb2.CreateSessionRequest(email="victim@example.com", password="not the password!"))
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await login(auth_pb2.CreateSessionRequest(email="Victim@example.com", password=PASSWORD))
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 1 <= int(dict(limited.value.initial_metadata())["retry-after"]) <= 900
        assert "right password is refused too" in error_of(limited.value)["message"]
        # Another account is not locked by it (the address allows more failures than an email).
        other = await signup(served, "bystander@example.com")
        assert (await login(auth_pb2.CreateSessionRequest(email=other.account.email, password=PASSWORD))).session_token
        assert reply.account.id


async def test_right_passwords_are_not_failures(db_target):
    async with auth_rig.serving(db_target) as served:
        await signup(served, "often@example.com")
        for _ in range(15):
            assert (await served["accounts"].CreateSession(
                auth_pb2.CreateSessionRequest(email="often@example.com", password=PASSWORD))).session_token


async def test_signups_per_address_are_limited_and_refused_ones_create_nothing(db_target):
    async with auth_rig.serving(db_target, client_limits={"signups_per_address": 2}) as served:
        await signup(served, "one@example.com")
        await signup(served, "two@example.com")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await signup(served, "three@example.com")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(served["ledger"].opened) == 2
        with pytest.raises(grpc.aio.AioRpcError):
            await served["admin"].LookupAccount(auth_pb2.LookupAccountRequest(query="three@example.com"))


async def test_a_tiers_maximum_of_keys_counts_keys_revoked_within_the_window(auth):
    reply = await signup(auth)
    md = as_account(reply.account.id)
    now = [1_800_000_000]
    auth["state"].clock = lambda: now[0]
    made = [await auth["accounts"].CreateKey(auth_pb2.CreateKeyRequest(name=f"k{n}"), metadata=md) for n in range(2)]
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await auth["accounts"].CreateKey(auth_pb2.CreateKeyRequest(name="fourth"), metadata=md)
    assert error_of(full.value)["code"] == "too_many_keys"
    await auth["accounts"].RevokeKey(auth_pb2.RevokeKeyRequest(key_id=made[0].key.id), metadata=md)
    now[0] += 60  # revoked a minute ago: its window may still admit calls
    with pytest.raises(grpc.aio.AioRpcError):
        await auth["accounts"].CreateKey(auth_pb2.CreateKeyRequest(name="churn"), metadata=md)
    now[0] += 2
    await auth["accounts"].CreateKey(auth_pb2.CreateKeyRequest(name="after the window"), metadata=md)
    await auth["admin"].SetAccountTier(auth_pb2.SetAccountTierRequest(account_id=reply.account.id, tier="elevated"))
    for n in range(7):  # Elevated: 10 keys
        await auth["accounts"].CreateKey(auth_pb2.CreateKeyRequest(name=f"e{n}"), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError):
        await auth["accounts"].CreateKey(auth_pb2.CreateKeyRequest(name="eleventh"), metadata=md)


async def test_parallel_key_creation_never_passes_the_maximum(auth):
    reply = await signup(auth)
    md = as_account(reply.account.id)
    results = await asyncio.gather(*[auth["accounts"].CreateKey(auth_pb2.CreateKeyRequest(name=f"p{n}"), metadata=md)
                                     for n in range(12)], return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 2
    live = await auth["accounts"].ListKeys(auth_pb2.ListKeysRequest(), metadata=md)
    assert len(live.data) == 3


async def test_keys_are_refused_where_a_session_is_required(auth):
    reply = await signup(auth)
    await auth["admin"].VerifyEmail(auth_pb2.AdminVerifyEmailRequest(query=reply.account.id))
    denied = await auth["check"].Check(check_request({"authorization": f"Bearer {reply.api_key}"}, "session",
                                                     "/v1/keys"))
    assert denied.denied_response.status.code == 403
    assert json.loads(denied.denied_response.body)["error"]["code"] == "session_required"
    session = await auth["accounts"].CreateSession(auth_pb2.CreateSessionRequest(email=reply.account.email,
                                                                                 password=PASSWORD))
    allowed = await auth["check"].Check(check_request({"authorization": f"Bearer {session.session_token}"},
                                                      "session", "/v1/keys"))
    assert allowed.HasField("ok_response")
