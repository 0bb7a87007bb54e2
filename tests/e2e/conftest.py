"""The whole mesh behind the real Envoy, started once per test session on free ports."""
import dataclasses
import uuid

import httpx
import pytest

from devtool import up
from tests.conftest import POSTGRES_URL  # noqa: F401  (re-exported for e2e modules)

PASSWORD = "correct horse battery staple"


def mesh_config(tmp_path, replicas: int = 1, **overrides) -> up.MeshConfig:
    return up.config_on_free_ports(tmp_path, replicas, **{"log_level": "INFO", **overrides})


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    instance = up.Mesh(mesh_config(tmp_path_factory.mktemp("mesh")))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def base_url(mesh) -> str:
    return mesh.config.base_url


@dataclasses.dataclass
class Customer:
    email: str
    account_id: str
    api_key: str
    key_id: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def signup(base_url: str) -> Customer:
    email = f"e2e-{uuid.uuid4().hex[:10]}@example.com"
    reply = httpx.post(f"{base_url}/v1/accounts", json={"email": email, "password": PASSWORD}, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return Customer(email=email, account_id=body["account"]["id"], api_key=body["api_key"], key_id=body["key"]["id"])


@pytest.fixture
def customer(base_url) -> Customer:
    return signup(base_url)


def assert_openai_error(reply: httpx.Response, status: int, code=..., error_type: str | None = None) -> dict:
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code", "param"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    if code is not ...:
        assert error["code"] == code, error
    if error_type is not None:
        assert error["type"] == error_type, error
    return error
