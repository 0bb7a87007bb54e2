"""The whole mesh behind the real Envoy, started once per test session on free ports.

After each module, `./dev admin reconcile` runs on the mesh the module used and must
exit 0 (reconciled_after_module)."""
import asyncio
import contextlib
import dataclasses
import email
import email.message
import email.policy
import io
import json
import pathlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from aiosmtpd.controller import Controller

from common import tls
from devtool import admin, up
from tests.conftest import POSTGRES_URL  # noqa: F401  (re-exported for e2e modules)
from tokens.auth.v1 import auth_pb2, auth_pb2_grpc

PASSWORD = "correct horse battery staple"
# The e2e meshes sign up hundreds of accounts and try many wrong logins, all from
# 127.0.0.1: the limits per client address are off here (0), because they would refuse
# the tests' own setup, not an attack. tests/abuse runs meshes with every default and
# proves those limits hold.
PER_ADDRESS_LIMITS_OFF = {"TOKENS_SIGNUPS_PER_IP_PER_HOUR": "0", "TOKENS_LOGIN_FAILURES_PER_IP": "0"}
# base URL -> the data dir of the mesh there (its run.json), so that signup() can verify.
_DATA_DIRS: dict[str, pathlib.Path] = {}


def mesh_config(tmp_path, replicas: int = 1, *, limits_off: bool = True, **overrides) -> up.MeshConfig:
    """A mesh on free ports; `limits_off` (the e2e default, see PER_ADDRESS_LIMITS_OFF) unless a
    test needs the limits per client address in force."""
    extra_env = {**(PER_ADDRESS_LIMITS_OFF if limits_off else {}), **overrides.pop("extra_env", {})}
    config = up.config_on_free_ports(tmp_path, replicas, **{"log_level": "INFO", "extra_env": extra_env,
                                                            **overrides})
    _DATA_DIRS[config.base_url] = config.data_dir
    return config


# The fixtures that start a mesh for a module (or the session); a value is a Mesh or has one.
MESH_FIXTURES = ("mesh", "media_mesh")
RECONCILE_TIMEOUT_S = 120.0


async def reconcile(mesh: up.Mesh) -> str:
    """`./dev admin reconcile` against `mesh` (the command's own code, in this process):
    asserts it exits 0 and returns what it printed."""
    out = io.StringIO()
    code = await admin.reconcile(mesh.config.addresses("ledger_svc"), mesh.config.tls_files(), out=out,
                                 timeout_s=RECONCILE_TIMEOUT_S)
    assert code == 0, f"./dev admin reconcile exited {code}:\n{out.getvalue()}"
    return out.getvalue()


def reconcile_after_module(request):
    """Generator body of a module-scoped autouse fixture: the meshes the module's tests use are
    set up first (so they are still running at its teardown), and after the module's last test
    each is reconciled."""
    items = [item for item in request.session.items if item.module is request.module]
    names = [name for name in MESH_FIXTURES if any(name in item.fixturenames for item in items)]
    meshes = [request.getfixturevalue(name) for name in names]
    yield
    for value in meshes:
        mesh = value if isinstance(value, up.Mesh) else value.mesh
        output = asyncio.run(reconcile(mesh))
        print(f"\n[reconcile after {request.module.__name__}]\n{output}", end="", flush=True)


@pytest.fixture(scope="module", autouse=True)
def reconciled_after_module(request):
    yield from reconcile_after_module(request)


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    instance = up.Mesh(mesh_config(tmp_path_factory.mktemp("mesh")))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def base_url(mesh) -> str:
    """The mesh's URL: the session's, or the module's own where a module starts one."""
    return mesh.config.base_url


@pytest.fixture
def operator(mesh, monkeypatch):
    """`./dev admin ARGS...` against the mesh; returns what it printed, as JSON."""
    return admin_json(mesh, monkeypatch)


@dataclasses.dataclass
class Customer:
    email: str
    account_id: str
    api_key: str
    key_id: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def signup(base_url: str, *, verified: bool = True) -> Customer:
    """A new account; verified (as an operator would, `./dev admin verify`) unless told not to,
    since its keys cannot spend before."""
    email = f"e2e-{uuid.uuid4().hex[:10]}@example.com"
    reply = httpx.post(f"{base_url}/v1/accounts", json={"email": email, "password": PASSWORD}, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    if verified:
        verify_as_operator(base_url, email)
    return Customer(email=email, account_id=body["account"]["id"], api_key=body["api_key"], key_id=body["key"]["id"])


def verify_as_operator(base_url: str, email: str) -> None:
    """AuthAdmin.VerifyEmail on the mesh at `base_url` (what `./dev admin verify EMAIL` calls)."""
    run = json.loads((_DATA_DIRS[base_url] / "run.json").read_text())
    address = run["services"]["auth_svc"].split(",")[0]
    with tls.blocking_channel(address, tls.Files.in_dir(run["tls_dir"], "operator")) as channel:
        account = auth_pb2_grpc.AuthAdminStub(channel).VerifyEmail(
            auth_pb2.AdminVerifyEmailRequest(query=email), timeout=10)
    assert account.email_verified, account


def session_of(base_url: str, customer: Customer) -> dict[str, str]:
    """A dashboard session's bearer header: what keys, cards and top-ups are managed with."""
    reply = httpx.post(f"{base_url}/v1/sessions", json={"email": customer.email, "password": PASSWORD}, timeout=30)
    assert reply.status_code == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['session_token']}"}


@pytest.fixture
def customer(base_url) -> Customer:
    return signup(base_url)


def eventually(probe, what: str, timeout_s: float, interval_s: float = 0.05):
    """probe()'s first truthy value, asked every interval_s; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(interval_s)


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


# A real SMTP server (aiosmtpd) and a mesh that mails to it; `./dev admin` against a mesh.

VERIFY_SUBJECT = "Verify your email"


class Inbox:
    """aiosmtpd handler keeping every message it receives."""

    port: int

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[tuple[tuple[str, ...], email.message.EmailMessage]] = []

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        with self._lock:
            self._messages.append((tuple(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def to(self, address: str, *, verification: bool = False) -> list[email.message.EmailMessage]:
        """The messages to `address`: its notices, or (verification=True) its verification links."""
        with self._lock:
            return [m for rcpt, m in self._messages
                    if address in rcpt and m["Subject"].startswith(VERIFY_SUBJECT) == verification]

    def links(self, address: str) -> list[str]:
        """The verification links mailed to `address`, oldest first."""
        return [word for m in self.to(address, verification=True)
                for word in m.get_body(("plain",)).get_content().split() if "/dashboard/verify#" in word]


@contextlib.contextmanager
def smtp_inbox() -> Iterator[Inbox]:
    handler = Inbox()
    # A free port picked here (port 0 fails: start() connects back), on 127.0.0.1, not ::1.
    controller = Controller(handler, hostname="127.0.0.1", port=up.free_ports(1)[0])
    controller.start()
    handler.port = controller.port
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def inbox():
    """A real SMTP server for a module whose mesh mails to it (mesh_mailing_to)."""
    with smtp_inbox() as handler:
        yield handler


@contextlib.contextmanager
def mesh_mailing_to(tmp_path, inbox: Inbox) -> Iterator[up.Mesh]:
    instance = up.Mesh(mesh_config(tmp_path, extra_env={"TOKENS_SMTP_URL": f"smtp://127.0.0.1:{inbox.port}"}))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def admin_json(mesh: up.Mesh, monkeypatch) -> Callable[..., dict]:
    """`./dev admin ARGS...` against this mesh; returns what it printed, as JSON."""
    monkeypatch.setenv("TOKENS_DATA_DIR", str(mesh.config.data_dir))
    monkeypatch.delenv("TOKENS_INTERNAL_TOKEN", raising=False)

    def run(*argv: str) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert admin.main(list(argv)) == 0
        return json.loads(out.getvalue())

    return run
