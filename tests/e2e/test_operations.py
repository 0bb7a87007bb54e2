"""What operators watch: health in Envoy's admin, Prometheus metrics of every
service, and a clean stop."""
import httpx

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
