"""The mesh the account attacks run against: every limit at its default, mail to a real SMTP
server (aiosmtpd), and clients that connect from addresses of their own.

Envoy listens on 127.0.0.1; a client may connect from any address of the loopback range
(127.0.0.2, 127.0.0.3, ...), and Envoy takes that peer as the client's address (no
x-forwarded-for hop is trusted). So each attack runs from an address of its own and the
limits per address of one attack never touch another's. Test modules import the fixtures
they use from here.
"""
import contextlib
import dataclasses
import itertools
import uuid

import httpx
import pytest

from devtool import up
from tests.e2e.conftest import PASSWORD, Customer, admin_json, eventually, mesh_config, smtp_inbox

EMAIL_S_MAX = 15.0
# 127.0.0.1 is Envoy's and the other suites'; tests take addresses from 127.0.2.0 on.
_ADDRESSES = (f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in itertools.count(2 << 8))


def new_address() -> str:
    return next(_ADDRESSES)


@pytest.fixture(scope="session")
def abuse_inbox():
    with smtp_inbox() as inbox:
        yield inbox


@pytest.fixture(scope="session")
def abuse_mesh(tmp_path_factory, abuse_inbox):
    # limits_off=False: these tests are the ones that prove the limits per address hold.
    config = mesh_config(tmp_path_factory.mktemp("abuse-mesh"), limits_off=False,
                         extra_env={"TOKENS_SMTP_URL": f"smtp://127.0.0.1:{abuse_inbox.port}"})
    instance = up.Mesh(config)
    instance.start()
    yield instance
    instance.stop()


def client_from(address: str, base_url: str) -> httpx.Client:
    """An HTTP client whose connections come from `address` (a loopback address of its own)."""
    return httpx.Client(base_url=base_url, timeout=30, transport=httpx.HTTPTransport(local_address=address))


@pytest.fixture
def attacker(abuse_mesh):
    """A client from a loopback address no other test uses."""
    with client_from(new_address(), abuse_mesh.config.base_url) as client:
        yield client


@pytest.fixture
def operator(abuse_mesh, monkeypatch):
    return admin_json(abuse_mesh, monkeypatch)


@dataclasses.dataclass
class Person(Customer):
    """A customer logged in to the dashboard: `session` is its bearer header."""
    session: dict[str, str]


def follow_link(client: httpx.Client, inbox, email: str) -> dict:
    """Follows the newest verification link mailed to `email`, as the dashboard does with it."""
    link = eventually(lambda: inbox.links(email), f"the verification link for {email}", EMAIL_S_MAX)[-1]
    reply = client.post("/v1/email-verifications", json={"token": link.rsplit("#", 1)[1]})
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture
def person(abuse_mesh, abuse_inbox):
    """make(verified=True): a new account, signed up from an address of its own, its email
    verified by following the mailed link, logged in to the dashboard."""
    def make(verified: bool = True) -> Person:
        with client_from(new_address(), abuse_mesh.config.base_url) as client:
            email = f"abuse-{uuid.uuid4().hex[:10]}@example.com"
            reply = client.post("/v1/accounts", json={"email": email, "password": PASSWORD})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            if verified:
                follow_link(client, abuse_inbox, email)
            session = client.post("/v1/sessions", json={"email": email, "password": PASSWORD}).json()
            return Person(email, body["account"]["id"], body["api_key"], body["key"]["id"],
                          {"Authorization": f"Bearer {session['session_token']}"})
    return make


@contextlib.contextmanager
def no_new_accounts(operator):
    """Asserts the ledger opened no account while the block ran."""
    before = operator("stats")["accounts"]
    yield
    assert operator("stats")["accounts"] == before
