"""The walking skeleton end to end: real Envoy, every service, the reference
backend; driven with httpx, the official openai client and native gRPC."""
import json

import grpc
import httpx
import openai
import pytest

from tests.e2e.conftest import PASSWORD, assert_openai_error, signup
from tokens.auth.v1 import auth_pb2, auth_pb2_grpc
from tokens.router.v1 import router_pb2, router_pb2_grpc

CHAT = {"model": "ref-chat", "messages": [{"role": "user", "content": "Hello there"}]}


def backend_requests(mesh) -> int:
    return httpx.get(f"http://127.0.0.1:{mesh.config.backend_port}/_stats").json()["requests"]


def test_envoy_sees_every_upstream_healthy(mesh):
    hosts = mesh.envoy_hosts()
    for cluster in ("auth", "ratelimit", "ledger", "router"):
        assert hosts[cluster] and all(h == "healthy" for h in hosts[cluster]), hosts


def test_signup_then_chat_with_the_openai_client(base_url, customer):
    account = httpx.get(f"{base_url}/v1/account", headers=customer.auth).json()
    assert account["balance_usd"] == "10.00" and account["tier"] == "free"
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=customer.api_key, max_retries=0)
    reply = client.chat.completions.create(model="ref-chat", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=5)
    assert reply.object == "chat.completion" and reply.model == "ref-chat"
    assert len(reply.choices[0].message.content.split()) == 5
    assert reply.usage.completion_tokens == 5 and reply.usage.prompt_tokens == 1 + 4 + 3


def test_streamed_chat_with_the_openai_client(base_url, customer):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=customer.api_key, max_retries=0)
    stream = client.chat.completions.create(model="ref-chat", messages=[{"role": "user", "content": "Stream"}],
                                            max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    words = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split()
    assert len(words) == 6
    assert chunks[-1].usage.completion_tokens == 6


def test_stream_true_on_the_same_path_streams_sse(base_url, customer):
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", headers=customer.auth,
                      json={**CHAT, "stream": True, "max_tokens": 3}, timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "text/event-stream"
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_completions_and_models_with_the_openai_client(base_url, customer):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=customer.api_key, max_retries=0)
    done = client.completions.create(model="ref-instruct", prompt="Once upon a time", max_tokens=4)
    assert len(done.choices[0].text.split()) == 4
    models = {m.id: m for m in client.models.list()}
    assert {"ref-chat", "ref-chat-large", "ref-instruct"} <= set(models)
    assert models["ref-chat"].model_extra["pricing"]["output_per_million_tokens"] == "1.50"
    assert client.models.retrieve("ref-chat").id == "ref-chat"


def test_native_grpc_through_envoy(mesh, customer):
    with grpc.insecure_channel(f"127.0.0.1:{mesh.config.port}") as channel:
        stub = router_pb2_grpc.InferenceStub(channel)
        request = router_pb2.CreateChatCompletionRequest(model="ref-chat", max_tokens=3)
        message = request.messages.add(role="user")
        message.content.string_value = "Hi over gRPC"
        auth = (("authorization", f"Bearer {customer.api_key}"),)
        reply = stub.Chat(request, metadata=auth, timeout=10)
        assert reply.usage.completion_tokens == 3 and reply.choices[0].message.role == "assistant"
        chunks = list(stub.StreamChat(request, metadata=auth, timeout=10))
        assert chunks[-1].usage.completion_tokens == 3
        with pytest.raises(grpc.RpcError) as caught:
            stub.Chat(request, metadata=(("authorization", "Bearer tsk_wrong"),), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        account = auth_pb2_grpc.AccountsStub(channel).GetAccount(auth_pb2.GetAccountRequest(), metadata=auth,
                                                                timeout=10)
        assert account.id == customer.account_id


def test_internal_services_are_not_routed(mesh, customer):
    with grpc.insecure_channel(f"127.0.0.1:{mesh.config.port}") as channel:
        admin = auth_pb2_grpc.AuthAdminStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            admin.SetKeyTier(auth_pb2.SetKeyTierRequest(key_id=customer.key_id, tier="paid"),
                             metadata=(("authorization", f"Bearer {customer.api_key}"),), timeout=10)
        assert caught.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)


def test_sessions_keys_and_revocation(base_url, customer):
    session = httpx.post(f"{base_url}/v1/sessions", json={"email": customer.email, "password": PASSWORD})
    assert session.status_code == 200, session.text
    assert "HttpOnly" in session.headers["set-cookie"]
    bearer = {"Authorization": f"Bearer {session.json()['session_token']}"}
    assert httpx.get(f"{base_url}/v1/account", headers=bearer).json()["id"] == customer.account_id
    created = httpx.post(f"{base_url}/v1/keys", headers=bearer, json={"name": "ci"}).json()
    secret = created["secret"]
    listed = httpx.get(f"{base_url}/v1/keys", headers=bearer).json()["data"]
    assert {k["name"] for k in listed} == {"default", "ci"} and secret not in json.dumps(listed)
    new_key = {"Authorization": f"Bearer {secret}"}
    assert httpx.post(f"{base_url}/v1/chat/completions", headers=new_key, json={**CHAT, "max_tokens": 1}).status_code == 200
    revoked = httpx.delete(f"{base_url}/v1/keys/{created['key']['id']}", headers=bearer)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert_openai_error(httpx.post(f"{base_url}/v1/chat/completions", headers=new_key, json=CHAT), 401,
                        "invalid_api_key")
    # A dashboard session cannot call models.
    assert_openai_error(httpx.post(f"{base_url}/v1/chat/completions", headers=bearer, json=CHAT), 401)


def test_signup_input_errors(base_url, customer):
    assert_openai_error(httpx.post(f"{base_url}/v1/accounts", json={"email": customer.email, "password": PASSWORD}),
                        409, "email_taken")
    assert_openai_error(httpx.post(f"{base_url}/v1/accounts", json={"email": "x@example.com", "password": "short"}),
                        400, "weak_password")
    assert_openai_error(httpx.post(f"{base_url}/v1/accounts", json={"email": "nope", "password": PASSWORD}),
                        400, "invalid_email")
    assert_openai_error(httpx.post(f"{base_url}/v1/accounts", content=b'{"email": '), 400)
    assert_openai_error(httpx.post(f"{base_url}/v1/sessions", json={"email": customer.email, "password": "wrong!!!!!!"}),
                        401, "invalid_credentials")


@pytest.mark.parametrize("name,send,status,code", [
    ("malformed json", {"content": b'{"model": "ref-chat", "messages": ['}, 400, None),
    ("wrong type", {"json": {**CHAT, "max_tokens": "many"}}, 400, None),
    ("wrong type nested", {"json": {"model": "ref-chat", "messages": "hello"}}, 400, None),
    ("negative max_tokens", {"json": {**CHAT, "max_tokens": -1}}, 400, "invalid_value"),
    ("unknown model", {"json": {**CHAT, "model": "gpt-nonexistent"}}, 404, "model_not_found"),
    ("empty messages", {"json": {**CHAT, "messages": []}}, 400, None),
])
def test_bad_requests_are_openai_errors_that_never_reach_the_backend(mesh, base_url, customer, name, send,
                                                                     status, code):
    before = backend_requests(mesh)
    reply = httpx.post(f"{base_url}/v1/chat/completions", headers=customer.auth, **send)
    assert_openai_error(reply, status, code)
    assert "x-ratelimit-limit-requests" in reply.headers
    assert backend_requests(mesh) == before


def test_unknown_path_is_404(base_url, customer):
    assert_openai_error(httpx.post(f"{base_url}/v1/nothing/here", headers=customer.auth, json={}), 404)
    assert_openai_error(httpx.get(f"{base_url}/v2/models", headers=customer.auth), 404)
    assert_openai_error(httpx.get(f"{base_url}/v1/chat/completions", headers=customer.auth), 404)


@pytest.mark.parametrize("headers,code", [
    ({}, None),
    ({"Authorization": "Bearer tsk_notakey"}, "invalid_api_key"),
    ({"Authorization": "Bearer tsk_" + "A" * 38}, "invalid_api_key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
])
def test_missing_or_bad_keys_are_401(mesh, base_url, headers, code):
    before = backend_requests(mesh)
    assert_openai_error(httpx.post(f"{base_url}/v1/chat/completions", headers=headers, json=CHAT), 401, code)
    assert backend_requests(mesh) == before


def test_oversized_body_is_413(mesh, base_url, customer):
    before = backend_requests(mesh)
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    reply = httpx.post(f"{base_url}/v1/chat/completions", headers=customer.auth, json=huge, timeout=30)
    assert_openai_error(reply, 413)
    assert backend_requests(mesh) == before


def test_client_sent_internal_headers_are_ignored(base_url, customer):
    victim = signup(base_url)
    spoof = {**customer.auth, "x-ts-account": victim.account_id, "x-ts-tier": "paid", "x-ts-key": victim.key_id,
             "x-ts-auth": "session", "x-ts-hold": "hold-of-someone", "x-ts-price": "input_per_million_tokens=0"}
    account = httpx.get(f"{base_url}/v1/account", headers=spoof)
    assert account.json()["id"] == customer.account_id
    reply = httpx.post(f"{base_url}/v1/chat/completions", headers=spoof, json={**CHAT, "max_tokens": 2})
    assert reply.status_code == 200
    assert reply.headers["x-ratelimit-limit-requests"] == "10"  # free, not the spoofed paid tier
    assert reply.json()["usage"]["cost"] != "0.00"


def test_request_ids_are_generated_by_envoy(base_url, customer):
    reply = httpx.get(f"{base_url}/v1/models", headers={**customer.auth, "x-request-id": "mine"})
    assert reply.headers["x-request-id"] and reply.headers["x-request-id"] != "mine"
