"""Graceful shutdown: on SIGTERM a replica reports NOT_SERVING, Envoy stops
sending it calls, and the calls it already has finish and are settled."""
import asyncio
import signal
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import tls
from devtool import up
from tests.e2e.conftest import mesh_config, signup

SLOW = {"model": "ref-chat", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "go [[tokens=60]] [[delay_ms=50]]"}]}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    # Envoy checks health every second and needs two failures: draining for
    # four seconds covers that.
    instance = up.Mesh(mesh_config(tmp_path_factory.mktemp("shutdown"), replicas_of={"router_svc": 2},
                                   drain_s=4.0))
    instance.start()
    yield instance
    instance.stop()


def serving(mesh: up.Mesh, port: int) -> bool:
    with tls.blocking_channel(f"127.0.0.1:{port}", mesh.config.tls_files()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def stream(client: httpx.AsyncClient, base_url: str, auth: dict) -> tuple[int, int]:
    """(words received, completion tokens in the final usage chunk)."""
    words, usage = 0, -1
    async with client.stream("POST", f"{base_url}/v1/chat/completions", headers=auth, json=SLOW) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            import json
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                words += len((chunk["choices"][0]["delta"].get("content") or "").split())
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    return words, usage


@pytest.fixture(scope="module")
def customer(mesh):
    import os
    from devtool import admin
    customer = signup(mesh.config.base_url)
    os.environ["TOKENS_DATA_DIR"] = str(mesh.config.data_dir)
    admin.main(["account-tier", customer.account_id, "paid"])
    return customer


async def test_sigterm_drains_a_router_replica_without_losing_a_call(mesh, customer):
    base_url = mesh.config.base_url
    async with httpx.AsyncClient(timeout=60) as client:
        in_flight = [asyncio.create_task(stream(client, base_url, customer.auth)) for _ in range(6)]
        await asyncio.sleep(0.5)  # the streams are running on both replicas now
        victim = mesh.procs["router_svc#0"]
        victim.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert not serving(mesh, mesh.config.grpc_port("router_svc", 0))
        # New calls keep succeeding while the replica drains and after it is gone.
        during = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            reply = await client.post(f"{base_url}/v1/chat/completions", headers=customer.auth,
                                      json={"model": "ref-chat", "max_tokens": 1,
                                            "messages": [{"role": "user", "content": "hi"}]})
            during.append(reply.status_code)
            await asyncio.sleep(0.1)
        results = await asyncio.gather(*in_flight)
    assert set(during) == {200}, during
    # Every stream that was in flight finished whole, with its usage.
    assert results == [(60, 60)] * 6, results
    assert victim.wait(20) == 0
    # ... and was settled: six streams and the calls made during the drain.
    for _ in range(100):
        usage = httpx.get(f"{base_url}/v1/usage", headers=customer.auth, params={"limit": 1000}).json()
        if len(usage["data"]) == 6 + len(during):
            break
        await asyncio.sleep(0.1)
    assert len(usage["data"]) == 6 + len(during)
    assert sum(int(r["units"]["output_tokens"]) for r in usage["data"]) == 6 * 60 + len(during)
    assert mesh.envoy_hosts()["router"].count("healthy") == 1
