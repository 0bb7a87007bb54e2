"""docker-compose.yml cannot run here (no Docker engine), so the file itself is
tested: it parses, every command exists, every service's settings come out of
its variables as intended (compose's ${VAR:-default} and ${VAR:?message}
substitution is done here as compose does it), it cannot start without its
passwords, and Envoy's config matches the services and holds no secret."""
import importlib.util
import pathlib
import re
import shutil
import subprocess
import urllib.parse

import pytest
import yaml

from common import config as common_config, tls
from devtool import certs, compose, envoy_config

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(TEXT)
SERVICES = COMPOSE["services"]
APP_MODULES = {"auth": "auth_svc", "ratelimit": "ratelimit_svc", "ledger": "ledger_svc", "router": "router_svc"}
# What an operator exports before `docker compose up` (the file's header says so).
OPERATOR_ENV = {"TOKENS_POSTGRES_PASSWORD": "pg-s3cret", "TOKENS_REDIS_PASSWORD": "redis-s3cret"}
PASSWORDS = tuple(OPERATOR_ENV)


class Refused(Exception):
    """Compose would not start: a ${VAR:?message} variable is unset or empty."""


def substitute(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?message}; $$ is a literal $."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = env.get(name, "")
        if op == ":?" and not value:
            raise Refused(f"{name}: {arg}")
        if op == ":-" and not value:
            return arg
        return value

    out = re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:\?|:-)([^}]*))?\}", one, text.replace("$$", "\0"))
    return out.replace("\0", "$")


def env_of(name: str, env: dict[str, str] = OPERATOR_ENV) -> dict[str, str]:
    return {key: substitute(str(value), env) for key, value in SERVICES[name].get("environment", {}).items()}


def test_two_replicas_of_every_service_and_the_dependencies():
    for prefix in APP_MODULES:
        assert {f"{prefix}-1", f"{prefix}-2"} <= set(SERVICES)
    assert {"postgres", "redis", "migrate", "reference", "envoy"} <= set(SERVICES)
    assert SERVICES["envoy"]["image"].startswith("envoyproxy/envoy:")


def test_every_python_command_is_a_module_of_this_repo():
    for name, service in SERVICES.items():
        command = service.get("command")
        if isinstance(command, list) and command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, (name, command)
        health = service.get("healthcheck", {}).get("test", [])
        if "devtool.healthcheck" in health:
            assert health[-1] == env_of(name)["TOKENS_GRPC_PORT"], name
    migrate = SERVICES["migrate"]["command"][-1]
    assert "python -m devtool admin migrate" in migrate and "envoy.compose.yaml" in migrate
    assert "dashboard" in migrate


@pytest.mark.parametrize("name", [f"{p}-{r}" for p in APP_MODULES for r in (1, 2)])
def test_each_service_reads_what_compose_sets(name, monkeypatch):
    env = env_of(name)
    for key in list(__import__("os").environ):
        if key.startswith("TOKENS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    module = APP_MODULES[name.split("-")[0]]
    settings = importlib.import_module(f"{module}.config").Settings.from_env()
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == int(env["TOKENS_GRPC_PORT"])
    assert settings.server.tls == tls.Files.in_dir(compose.TLS_DIR, "service")
    assert {"tls:/etc/tokens-tls:ro"} <= set(SERVICES[name]["volumes"]) and compose.TLS_DIR == "/etc/tokens-tls"
    assert settings.server.metrics_port == 9100 and settings.server.drain_s > 0
    if hasattr(settings, "database_url"):
        assert settings.database_url == env["TOKENS_DATABASE_URL"]
        assert settings.database_url.endswith("/tokens_" + name.split("-")[0])
    if hasattr(settings, "ledger_addr"):
        assert settings.ledger_addr == "ledger-1:50053,ledger-2:50053"
    if hasattr(settings, "auth_addr"):
        assert settings.auth_addr == "auth-1:50051,auth-2:50051"
    if hasattr(settings, "redis_url"):
        assert settings.redis_url == "redis://:redis-s3cret@redis:6379/0"


def test_migrations_get_every_database():
    env = env_of("migrate")
    for service in ("AUTH", "LEDGER", "ROUTER"):
        assert env[f"TOKENS_{service}_DATABASE_URL"].endswith(f"/tokens_{service.lower()}")
    init = (ROOT / "deploy" / "postgres-init.sql").read_text()
    assert "tokens_ledger" in init and "tokens_router" in init


def test_envoy_template_is_current_and_points_at_the_services():
    assert (ROOT / "envoy" / "envoy.compose.yaml").read_text() == compose.render()
    clusters = {c["name"]: c for c in yaml.safe_load(compose.render())["static_resources"]["clusters"]}
    for cluster, module in (("auth", "auth"), ("ratelimit", "ratelimit"), ("ledger", "ledger"), ("router", "router")):
        hosts = [e["endpoint"]["address"]["socket_address"]
                 for e in clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"]]
        for replica, host in enumerate(hosts, start=1):
            assert host["address"] == f"{module}-{replica}"
            assert host["port_value"] == int(env_of(f"{module}-{replica}")["TOKENS_GRPC_PORT"])
        assert clusters[cluster]["type"] == "STRICT_DNS"
    assert SERVICES["envoy"]["command"][:3] == ["envoy", "-c", "/etc/envoy-config/envoy.compose.yaml"]


def test_compose_refuses_to_start_without_the_database_and_redis_passwords():
    substitute(TEXT, OPERATOR_ENV)
    for missing in PASSWORDS:
        for env in ({k: v for k, v in OPERATOR_ENV.items() if k != missing}, {**OPERATOR_ENV, missing: ""}):
            with pytest.raises(Refused, match=missing):
                substitute(TEXT, env)
        # No default anywhere: every use of it is the refusing form.
        uses = re.findall(r"\$\{" + missing + r"([^}]*)\}", TEXT)
        assert uses and all(use.startswith(":?") for use in uses), uses
    assert "TOKENS_INTERNAL_TOKEN" not in TEXT


def test_redis_requires_auth_and_every_url_carries_the_passwords():
    redis = SERVICES["redis"]
    command = substitute(" ".join(redis["command"]), OPERATOR_ENV)
    assert '--requirepass "$TOKENS_REDIS_PASSWORD"' in command
    assert env_of("redis")["TOKENS_REDIS_PASSWORD"] == "redis-s3cret"
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    for name in ("ratelimit-1", "ratelimit-2"):
        url = urllib.parse.urlsplit(env_of(name)["TOKENS_REDIS_URL"])
        assert (url.hostname, url.password) == ("redis", "redis-s3cret"), url
    assert env_of("postgres")["POSTGRES_PASSWORD"] == "pg-s3cret"
    urls = [value for name in SERVICES for key, value in env_of(name).items() if key.endswith("DATABASE_URL")]
    assert len(urls) >= 9 and all(urllib.parse.urlsplit(url).password == "pg-s3cret" for url in urls), urls


def test_envoy_admin_listens_on_loopback_only_and_is_not_published():
    admin = yaml.safe_load(compose.render())["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    assert not any("9901" in str(port) for port in SERVICES["envoy"].get("ports", []))


def test_every_internal_hop_is_mutual_tls_with_the_certs_containers_files():
    rendered = compose.render()
    assert "x-ts-internal" not in rendered
    for cluster in yaml.safe_load(rendered)["static_resources"]["clusters"]:
        context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        [pair] = context["tls_certificates"]
        assert pair == {"certificate_chain": {"filename": "/etc/tokens-tls/envoy.pem"},
                        "private_key": {"filename": "/etc/tokens-tls/envoy-key.pem"}}, cluster["name"]
        assert context["validation_context"]["trusted_ca"] == {"filename": "/etc/tokens-tls/ca.pem"}
    assert "tls:/etc/tokens-tls:ro" in SERVICES["envoy"]["volumes"]
    assert SERVICES["envoy"]["environment"]["ENVOY_UID"] == "101"
    made = SERVICES["certs"]["command"]
    assert made[:4] == ["python", "-m", "devtool.certs", "/etc/tokens-tls"] and "--if-absent" in made
    assert {"service=65534", "operator=65534", "envoy=101"} <= set(made)
    assert SERVICES["migrate"]["depends_on"]["certs"]["condition"] == "service_completed_successfully"


def test_a_service_on_a_public_address_refuses_to_start_without_tls(monkeypatch):
    monkeypatch.delenv("TOKENS_TLS_DIR", raising=False)
    monkeypatch.setenv("TOKENS_HOST", "0.0.0.0")
    with pytest.raises(common_config.ConfigError, match="TOKENS_TLS_DIR"):
        common_config.ServerSettings.from_env(50051)
    monkeypatch.setenv("TOKENS_HOST", "127.0.0.1")
    assert common_config.ServerSettings.from_env(50051).tls is None


def test_the_envoy_config_loads_in_envoy(tmp_path):
    envoy = shutil.which("envoy") or str(pathlib.Path(__import__("sys").executable).parent / "envoy")
    certs.make(tmp_path / "tls")
    topology = compose.topology(descriptor=str(ROOT / "gen" / "tokens.pb"), lua=str(ROOT / "envoy" / "errors.lua"),
                                tls_dir=str(tmp_path / "tls"), dashboard_dir=str(ROOT / "dashboard"))
    assert any(route == "/dashboard" for route, _file, _type in topology.static_files)
    path = envoy_config.write(topology, tmp_path / "envoy.yaml")
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
