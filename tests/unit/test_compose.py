"""docker-compose.yml cannot run here (no Docker engine), so the file itself is
tested: it parses, every command exists, every service's settings come out of
its variables as intended, and Envoy's config matches the services."""
import importlib.util
import pathlib
import shutil
import subprocess

import pytest
import yaml

from devtool import compose, envoy_config

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_MODULES = {"auth": "auth_svc", "ratelimit": "ratelimit_svc", "ledger": "ledger_svc", "router": "router_svc"}


def env_of(name: str) -> dict[str, str]:
    env = {}
    for key, value in SERVICES[name].get("environment", {}).items():
        # Compose substitutes ${VAR:-default} and ${VAR:?message}; take the default or a stand-in.
        text = str(value)
        if "${" in text:
            text = text.replace("${TOKENS_POSTGRES_PASSWORD:-tokens}", "tokens")
            text = text.replace("${TOKENS_INTERNAL_TOKEN:?set TOKENS_INTERNAL_TOKEN to a random secret}", "s3cret")
            text = text.replace("${TOKENS_PUBLIC_BASE_URL:-https://tokens.flex.ai}", "https://tokens.flex.ai")
            for var in ("TOKENS_SMTP_URL", "TOKENS_LAGO_API_URL", "TOKENS_LAGO_API_KEY", "TOKENS_STRIPE_API_KEY",
                        "TOKENS_STRIPE_PUBLISHABLE_KEY", "TOKENS_STRIPE_WEBHOOK_SECRET"):
                text = text.replace("${" + var + ":-}", "")
        assert "${" not in text, (name, key, value)
        env[key] = text
    return env


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
    assert settings.server.internal_token == "s3cret"
    assert settings.server.metrics_port == 9100 and settings.server.drain_s > 0
    if hasattr(settings, "database_url"):
        assert settings.database_url == env["TOKENS_DATABASE_URL"]
        assert settings.database_url.endswith("/tokens_" + name.split("-")[0])
    if hasattr(settings, "ledger_addr"):
        assert settings.ledger_addr == "ledger-1:50053,ledger-2:50053"
    if hasattr(settings, "auth_addr"):
        assert settings.auth_addr == "auth-1:50051,auth-2:50051"
    if hasattr(settings, "redis_url"):
        assert settings.redis_url == "redis://redis:6379/0"


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
    assert compose.TOKEN_PLACEHOLDER in compose.render()
    assert compose.TOKEN_PLACEHOLDER in SERVICES["envoy"]["command"][0]


def test_the_envoy_config_loads_in_envoy(tmp_path):
    envoy = shutil.which("envoy") or str(pathlib.Path(__import__("sys").executable).parent / "envoy")
    topology = compose.topology(descriptor=str(ROOT / "gen" / "tokens.pb"), lua=str(ROOT / "envoy" / "errors.lua"),
                                token="s3cret", dashboard_dir=str(ROOT / "dashboard"))
    assert any(route == "/dashboard" for route, _file, _type in topology.static_files)
    path = envoy_config.write(topology, tmp_path / "envoy.yaml")
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
