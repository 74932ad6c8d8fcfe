"""docker-compose.yml and deploy/Dockerfile: what is reachable, pinned images, no root, tokens as files.

(The Compose specification's schema is checked in tests/dashboards/test_grafana.py.) No Docker engine runs
here, so these read the files as Compose would, interpolation included.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fleetscope.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
ENV = {"GRAFANA_ADMIN_PASSWORD": "pw"}
OURS = "fleetscope:local"


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} in every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()), ENV if env is None else env)


def published(service: dict) -> list[tuple[str, str]]:
    """(host address, port spec) of each published port; no address means every interface."""
    out = []
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        out.append((parts[0] if len(parts) == 3 else "0.0.0.0", parts[-2] if len(parts) > 1 else parts[-1]))
    return out


def test_only_the_console_grafana_and_the_collector_are_published_and_the_console_on_loopback_only():
    services = compose()["services"]
    reachable = {name for name, svc in services.items() for host, _ in published(svc) if host != "127.0.0.1"}
    # Grafana has its own login; agents on other nodes post to the collector (firewalled, TLS in front)
    assert reachable == {"grafana", "collector"}
    for name in ("prometheus", "alertmanager", "victoriametrics"):
        assert "ports" not in services[name], name  # the stack's network only
    assert published(services["console"]) == [("127.0.0.1", "8501")]
    assert all(host == "127.0.0.1" for host, _ in published(services["agent"]))
    # COLLECTOR_BIND narrows the collector to one interface
    narrowed = compose({**ENV, "COLLECTOR_BIND": "10.0.0.5"})["services"]["collector"]
    assert published(narrowed) == [("10.0.0.5", "9837")]


def test_the_console_runs_without_sign_in_only_behind_the_loopback_publish():
    console = compose()["services"]["console"]
    args = build_parser().parse_args(console["command"])
    if args.auth == "none" and args.insecure:
        assert {host for host, _ in published(console)} == {"127.0.0.1"}


def test_every_fleetscope_command_in_the_stack_is_one_the_cli_takes():
    for name, service in compose()["services"].items():
        if service["image"] == OURS:
            command = service["command"]
            assert not any("token" in arg for arg in command), (name, command)
            build_parser().parse_args(command)  # exits on an unknown or refused flag


def test_images_are_pinned_to_versions():
    services = compose()["services"]
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
    assert services["prometheus"]["image"] == "prom/prometheus:v2.42.0"
    assert services["alertmanager"]["image"] == "prom/alertmanager:v0.25.0"
    from_line = next(line for line in (ROOT / "deploy/Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    assert re.fullmatch(r"FROM python:\d+\.\d+\.\d+-slim-\w+", from_line), from_line


@pytest.mark.parametrize("binary, service, pattern", [
    ("prometheus", "prometheus", r"prometheus, version (\d+\.\d+\.\d+)"),
    ("prometheus-alertmanager", "alertmanager", r"alertmanager, version (\d+\.\d+\.\d+)"),
])
def test_the_pinned_versions_are_the_ones_the_tests_run(binary, service, pattern):
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    version = re.search(pattern, out.stdout + out.stderr).group(1)
    assert compose()["services"][service]["image"].endswith(f":v{version}")


def test_nothing_runs_as_root():
    dockerfile = (ROOT / "deploy/Dockerfile").read_text().splitlines()
    user = [line.split()[1] for line in dockerfile if line.startswith("USER ")][-1]
    assert user.split(":")[0] not in ("0", "root")
    for name, service in compose()["services"].items():
        if service["image"] == OURS:
            assert service.get("user") in (None, "10001:10001"), name  # the image's own user
        else:
            assert service.get("user"), f"{name} must name a user: the upstream image may default to root"
            assert service["user"].split(":")[0] not in ("0", "root"), name
        assert service.get("cap_drop") == ["ALL"] and "no-new-privileges:true" in service.get("security_opt", []), name


def test_tokens_reach_the_containers_as_files():
    spec = compose()
    secrets = spec["secrets"]
    for name, service in spec["services"].items():
        mounted = {}
        for entry in service.get("secrets", []):
            source, target = (entry, None) if isinstance(entry, str) else (entry["source"], entry.get("target"))
            mounted[target or f"/run/secrets/{source}"] = source
        for key, value in (service.get("environment") or {}).items():
            if "TOKEN" in key or "PASSWORD" in key:
                if key == "GF_SECURITY_ADMIN_PASSWORD":
                    continue  # Grafana's admin password, required from the environment (below)
                assert key.endswith("_FILE") and value in mounted, (name, key, value)
    for secret in secrets.values():
        path = ROOT / secret["file"]
        assert path.parent == ROOT / "deploy" / "secrets"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} could be committed"


def test_grafana_has_no_default_admin_login():
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        compose({})
    grafana = compose()["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ENV["GRAFANA_ADMIN_PASSWORD"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
