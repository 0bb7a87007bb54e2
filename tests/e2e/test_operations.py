"""What operators watch: health in Envoy's admin, Prometheus metrics of every
service, and a clean stop."""
import httpx
import pytest

from devtool import up


def test_every_service_serves_prometheus_metrics(mesh, customer):
    httpx.post(f"{mesh.config.base_url}/v1/chat/completions", headers=customer.auth,
               json={"model": "ref-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    for service in up.SERVICES:
        text = httpx.get(f"http://127.0.0.1:{mesh.config.metrics_port(service)}/metrics").text
        assert "tokens_grpc_calls_total" in text, service
    router = httpx.get(f"http://127.0.0.1:{mesh.config.metrics_port('router_svc')}/metrics").text
    assert 'method="/tokens.router.v1.Inference/CreateChatCompletion"' in router
    ratelimit = httpx.get(f"http://127.0.0.1:{mesh.config.metrics_port('ratelimit_svc')}/metrics").text
    assert "ratelimit_decisions_total" in ratelimit
    envoy = httpx.get(f"http://127.0.0.1:{mesh.config.admin_port}/stats/prometheus").text
    assert "envoy_cluster_upstream_rq" in envoy


def test_services_refuse_calls_that_did_not_come_through_envoy(mesh, customer):
    """Forged trusted headers sent straight to a service port are refused: without the mesh's
    client certificate the TLS handshake fails (UNAVAILABLE), so no method runs."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
    from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
    from tokens.router.v1 import router_pb2, router_pb2_grpc

    forged = (("x-ts-auth", "key"), ("x-ts-account", customer.account_id), ("x-ts-key", customer.key_id),
              ("x-ts-hold", "h"), ("x-ts-price", "input_per_million_tokens=0"))
    calls = [
        ("router_svc", lambda ch: router_pb2_grpc.InferenceStub(ch).Chat(
            router_pb2.CreateChatCompletionRequest(model="ref-chat"), metadata=forged, timeout=5)),
        ("ledger_svc", lambda ch: ledger_pb2_grpc.LedgerStub(ch).Credit(
            ledger_pb2.CreditRequest(account_id=customer.account_id, amount_nanos=10**12, transfer_id="x",
                                     kind="adjustment", reason="forged"), metadata=forged, timeout=5)),
        ("ratelimit_svc", lambda ch: external_auth_pb2_grpc.AuthorizationStub(ch).Check(
            external_auth_pb2.CheckRequest(), metadata=forged, timeout=5)),
        ("auth_svc", lambda ch: external_auth_pb2_grpc.AuthorizationStub(ch).Check(
            external_auth_pb2.CheckRequest(), metadata=forged, timeout=5)),
    ]
    for service, call in calls:
        with grpc.insecure_channel(f"127.0.0.1:{mesh.config.grpc_port(service)}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                call(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, service
    account = httpx.get(f"{mesh.config.base_url}/v1/account", headers=customer.auth).json()
    assert account["balance_usd"] == "10.00"
