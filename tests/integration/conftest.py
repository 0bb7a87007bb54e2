"""Fixtures shared by the integration tests: the reference backend in this process
(test_reference_*.py, and behind router_svc), and router_svc itself (router_rig.py)."""
import contextlib

import httpx
import openai
import pytest

from backends.reference import app as ref_app, config as ref_config
from tests.integration import router_rig


@contextlib.asynccontextmanager
async def serve_reference(settings: ref_config.Settings):
    """The reference backend with `settings` (port 0: a free one) until the block ends: its base URL."""
    runner, port = await ref_app.start(settings)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def base_url():
    """The reference backend with its default settings."""
    async with serve_reference(ref_config.Settings(port=0)) as url:
        yield url


@pytest.fixture
async def http(base_url):
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture
async def oai(base_url):
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="anything", max_retries=0,
                                  timeout=30) as client:
        yield client


@pytest.fixture
async def reference():
    """The reference backend as router_svc's tests use it (16 tokens a reply, no delay)."""
    async with serve_reference(ref_config.Settings(host="127.0.0.1", port=0, token_delay_ms=0, default_tokens=16,
                                                   api_key="")) as url:
        yield url


@pytest.fixture
async def start_router(tmp_path):
    """start_router(urls, catalog_yaml, **settings) -> router_rig.Router; stopped after the test."""
    started: list[router_rig.Router] = []

    async def start(urls: list[str], catalog_yaml: str, **overrides) -> router_rig.Router:
        home = tmp_path / f"router-{len(started)}"  # each its own database and catalog
        home.mkdir()
        router = await router_rig.start(home, urls, catalog_yaml, **overrides)
        started.append(router)
        return router

    yield start
    for router in reversed(started):
        await router.close()
