"""auth_svc's side of tiers and the dashboard: an approved upgrade emails the customer through
ledger_svc (retried until the ledger takes it, once), a request for a tier the account already
has is refused, and the session cookie's writes need a JSON body (CSRF). auth_svc is built with
build_server on port 0 in front of a fake ledger_svc (a real gRPC server)."""
import json

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2

from tests.integration import auth_rig
from tokens.auth.v1 import auth_pb2

PASSWORD = auth_rig.PASSWORD


def upgrade_emails(auth):
    """The emails auth_svc asked the ledger to send, but the verification links of signups."""
    return [e for e in auth["ledger"].emails if e.kind != "verify_email"]


@pytest.fixture
async def auth(db_target):
    async with auth_rig.serving(db_target, ledger_timeout_s=1.0) as serving:
        yield serving


def as_account(account_id: str):
    return (("x-ts-auth", "session"), ("x-ts-account", account_id))


async def signup(auth, email="upgrade@example.com"):
    return await auth["accounts"].CreateAccount(auth_pb2.CreateAccountRequest(email=email, password=PASSWORD))


async def test_an_approved_upgrade_is_emailed_once_even_when_the_ledger_was_down(auth):
    reply = await signup(auth)
    asked = await auth["accounts"].CreateUpgradeRequest(auth_pb2.CreateUpgradeRequestRequest(reason="a shop bot"),
                                                        metadata=as_account(reply.account.id))
    auth["ledger"].mail_down = True
    decided = await auth["admin"].DecideUpgradeRequest(auth_pb2.DecideUpgradeRequestRequest(id=asked.id, approve=True))
    assert decided.status == "approved"  # the tier changed at once; the email waits for the ledger
    keys = await auth["accounts"].ListKeys(auth_pb2.ListKeysRequest(), metadata=as_account(reply.account.id))
    assert {k.tier for k in keys.data} == {"elevated"}
    assert upgrade_emails(auth) == []

    auth["ledger"].mail_down = False
    state = auth["state"]
    state.clock = lambda: 10**10  # later than the reconciler's grace
    await state.reconcile()
    await state.reconcile()
    assert [(e.account_id, e.kind, e.dedupe_key, dict(e.details)) for e in upgrade_emails(auth)] == [
        (reply.account.id, "tier_changed", f"upgrade:{asked.id}", {"tier": "elevated"})]


async def test_an_approval_emails_at_once_when_the_ledger_is_up_and_a_rejection_does_not(auth):
    first = await signup(auth, "first@example.com")
    second = await signup(auth, "second@example.com")
    ask = auth_pb2.CreateUpgradeRequestRequest()
    one = await auth["accounts"].CreateUpgradeRequest(ask, metadata=as_account(first.account.id))
    two = await auth["accounts"].CreateUpgradeRequest(ask, metadata=as_account(second.account.id))
    await auth["admin"].DecideUpgradeRequest(auth_pb2.DecideUpgradeRequestRequest(id=one.id, approve=True))
    await auth["admin"].DecideUpgradeRequest(auth_pb2.DecideUpgradeRequestRequest(id=two.id, approve=False))
    assert [e.account_id for e in upgrade_emails(auth)] == [first.account.id]


async def test_asking_for_a_tier_the_keys_already_have_is_refused(auth):
    reply = await signup(auth)
    await auth["admin"].SetAccountTier(auth_pb2.SetAccountTierRequest(account_id=reply.account.id, tier="paid",
                                                                      only_upgrade=True))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auth["accounts"].CreateUpgradeRequest(auth_pb2.CreateUpgradeRequestRequest(tier="elevated"),
                                                    metadata=as_account(reply.account.id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert json.loads(caught.value.details())["error"]["code"] == "already_upgraded"
    # And only_upgrade never lowers a key: elevated after paid changes nothing.
    after = await auth["admin"].SetAccountTier(auth_pb2.SetAccountTierRequest(
        account_id=reply.account.id, tier="elevated", only_upgrade=True))
    assert {k.tier for k in after.keys} == {"paid"}


def _check(cookie: str, method: str, content_type: str | None):
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = method, "/v1/keys"
    http.headers["cookie"] = f"ts_session={cookie}"
    if content_type:
        http.headers["content-type"] = content_type
    request.attributes.context_extensions["auth"] = "any"
    return request


@pytest.mark.parametrize("method, content_type, allowed", [
    ("GET", None, True),
    ("HEAD", None, True),
    ("POST", "application/json", True),
    ("POST", "application/json; charset=utf-8", True),
    ("DELETE", "application/json", True),
    ("POST", "application/grpc", True),
    ("POST", None, False),
    ("POST", "text/plain", False),
    ("POST", "application/x-www-form-urlencoded", False),
    ("POST", "multipart/form-data; boundary=x", False),
    ("DELETE", None, False),
    ("PUT", "text/plain;charset=UTF-8", False),
])
async def test_writes_with_the_session_cookie_need_a_body_no_form_can_send(auth, method, content_type, allowed):
    reply = await signup(auth)
    session = await auth["accounts"].CreateSession(auth_pb2.CreateSessionRequest(email=reply.account.email,
                                                                                 password=PASSWORD))
    answer = await auth["check"].Check(_check(session.session_token, method, content_type))
    if allowed:
        assert answer.HasField("ok_response"), answer
    else:
        assert answer.denied_response.status.code == 403, answer
        assert json.loads(answer.denied_response.body)["error"]["code"] == "csrf_check_failed"
    # A bearer session token is not a cookie a browser sends by itself: no such check.
    request = _check("", method, content_type)
    del request.attributes.request.http.headers["cookie"]
    request.attributes.request.http.headers["authorization"] = f"Bearer {session.session_token}"
    assert (await auth["check"].Check(request)).HasField("ok_response")
