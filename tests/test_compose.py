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

from fleetscope import assets
from fleetscope.cli import build_parser
from tests.conftest import require_binary

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
    from alerts.render_alertmanager import build_parser as renderer

    for name, service in compose()["services"].items():
        if service["image"] == OURS:
            command = service["command"]
            assert not any("token" in arg for arg in command), (name, command)
            if "entrypoint" in service:  # the one other program the image runs: Alertmanager's config renderer
                assert service["entrypoint"] == ["python", "-m", "alerts.render_alertmanager"], name
                renderer().parse_args(command)
            else:
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


# The configs as the containers see them. Each service's bind mounts and secrets are copied to where the
# container would find them, under a folder standing for its root; a named volume is one folder every service
# mounting it shares. Then the real promtool and amtool (Debian's, the versions the images pin) check them.

URLS = {"page-webhook-url": "https://pager.example/fleetscope?key=a&b=c\n", "ticket-webhook-url": "https://chat.example/hooks/T0\n"}


class Container:
    """The files one service's container sees, under `root` (absolute container paths are root / path)."""

    def __init__(self, spec: dict, name: str, root: Path, volumes: Path):
        self.service = spec["services"][name]
        self.root = root
        for entry in self.service.get("volumes", []):
            source, target = entry.split(":")[:2]
            if source.startswith("./"):
                self._copy(ROOT / source, self.path(target))
            else:  # a named volume, shared between the services that mount it
                (volumes / source).mkdir(parents=True, exist_ok=True)
                self.path(target).parent.mkdir(parents=True, exist_ok=True)
                self.path(target).symlink_to(volumes / source, target_is_directory=True)
        for entry in self.service.get("secrets", []):
            source, target = (entry, None) if isinstance(entry, str) else (entry["source"], entry.get("target"))
            assert spec["secrets"][source]["file"].startswith("./deploy/secrets/"), source
            at = self.path(target or f"/run/secrets/{source}")
            at.parent.mkdir(parents=True, exist_ok=True)
            at.write_text(URLS.get(source, "a-token\n"))

    def path(self, container_path: str) -> Path:
        assert container_path.startswith("/"), container_path
        return self.root / container_path.lstrip("/")

    @staticmethod
    def _copy(source: Path, target: Path):
        assert source.exists(), f"docker-compose.yml mounts {source}, which does not exist"
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)

    def flag(self, name: str) -> str:
        (value,) = [arg.split("=", 1)[1] for arg in self.service["command"] if arg.startswith(f"{name}=")]
        return value


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict[str, Container]:
    """Prometheus' and Alertmanager's containers, Alertmanager's config rendered as alertmanager-config renders it."""
    from alerts.render_alertmanager import main as render

    base = tmp_path_factory.mktemp("stack")
    spec = compose()
    made = {name: Container(spec, name, base / name, base / "volumes") for name in ("prometheus", "alertmanager-config", "alertmanager")}
    writer = made["alertmanager-config"]
    env = {key: str(writer.path(value)) if key.endswith("_FILE") else value for key, value in writer.service["environment"].items()}
    args = writer.service["command"]
    args = [str(writer.path(a)) if a.startswith("/") else a for a in args]
    with pytest.MonkeyPatch.context() as mp:
        for key in ("FLEETSCOPE_PAGE_WEBHOOK_URL", "FLEETSCOPE_TICKET_WEBHOOK_URL"):
            mp.delenv(key, raising=False)
            mp.delenv(f"{key}_FILE", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        render(args)
    return made


def test_alertmanager_runs_the_projects_routing_with_the_operators_receivers(stack):
    amtool = require_binary("amtool")
    am = stack["alertmanager"]
    config = am.path(am.flag("--config.file"))
    assert config.exists(), "Alertmanager's --config.file is not where alertmanager-config writes it"
    result = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "5 inhibit rules" in result.stdout, result.stdout + result.stderr
    # the same routing and inhibitions as alerts/alertmanager.yml: only the receivers' URLs differ
    ours = yaml.safe_load((ROOT / "alerts/alertmanager.yml").read_text())
    rendered = yaml.safe_load(config.read_text())
    urls = {r["name"]: r["webhook_configs"][0].pop("url") for r in rendered["receivers"]}
    for r in ours["receivers"]:
        r["webhook_configs"][0].pop("url")
    assert rendered == ours
    assert urls == {"page": URLS["page-webhook-url"].strip(), "ticket": URLS["ticket-webhook-url"].strip()}

    def route(labels: str) -> str:
        out = subprocess.run([amtool, "config", "routes", "test", f"--config.file={config}", *labels.split()],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    assert route("alertname=FleetscopeGpuLost severity=page") == "page"
    assert route("alertname=FleetscopeGpuXid severity=ticket") == "ticket"


def test_alertmanager_waits_for_its_config_and_mounts_the_projects_template_not_a_copy():
    spec = compose()
    writer, am = spec["services"]["alertmanager-config"], spec["services"]["alertmanager"]
    assert am["depends_on"] == {"alertmanager-config": {"condition": "service_completed_successfully"}}
    template = writer["command"][writer["command"].index("--template") + 1]
    assert f"./alerts/alertmanager.yml:{template}:ro" in writer["volumes"]
    assert not (ROOT / "deploy/alertmanager.yml").exists(), "a second Alertmanager config would drift from alerts/"
    for name in ("page-webhook-url", "ticket-webhook-url"):  # the header tells the operator what to fill in
        assert f"deploy/secrets/{name}" in (ROOT / "docker-compose.yml").read_text()


def test_rendering_refuses_a_webhook_that_is_not_a_url(tmp_path):
    from alerts.render_alertmanager import render

    (tmp_path / "page").write_text("fill me in\n")
    with pytest.raises(SystemExit, match="FLEETSCOPE_PAGE_WEBHOOK_URL must be an http"):
        render({"FLEETSCOPE_PAGE_WEBHOOK_URL_FILE": str(tmp_path / "page"), "FLEETSCOPE_TICKET_WEBHOOK_URL": "https://chat.example/x"})
    with pytest.raises(SystemExit, match="FLEETSCOPE_TICKET_WEBHOOK_URL_FILE"):
        render({"FLEETSCOPE_PAGE_WEBHOOK_URL": "https://pager.example/x"})


def _rebased(config: dict, container: Container) -> dict:
    """The Prometheus config with every file it names moved under the container's root folder."""
    config = yaml.safe_load(yaml.safe_dump(config))
    config["rule_files"] = [str(container.path(p)) for p in config.get("rule_files", [])]
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(container.path(p)) for p in sd["files"]]
        if "credentials_file" in job.get("authorization", {}):
            job["authorization"]["credentials_file"] = str(container.path(job["authorization"]["credentials_file"]))
    return config


def test_promtool_accepts_prometheus_config_with_the_projects_rules_and_the_agents_targets(stack):
    promtool = require_binary("promtool")
    prom = stack["prometheus"]
    config_path = prom.path(prom.flag("--config.file"))
    config = yaml.safe_load(config_path.read_text())
    # the rule files it loads are the project's own, all of them (the ./alerts mount)
    loaded = sorted(p for pattern in config["rule_files"] for p in prom.root.glob(pattern.lstrip("/")))
    assert [p.name for p in loaded] == [p.name for p in assets.rule_files()]
    assert all(p.read_text() == (ROOT / "alerts" / p.name).read_text() for p in loaded)
    rebased = config_path.with_name("rebased.yml")
    rebased.write_text(yaml.safe_dump(_rebased(config, prom)))
    result = subprocess.run([promtool, "check", "config", str(rebased)], capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    n_rules = sum(len(g["rules"]) for p in loaded for g in yaml.safe_load(p.read_text())["groups"])
    assert f"SUCCESS: {n_rules} rules found" in out, out


def _targets(job: dict, container: Container) -> list[str]:
    found = []
    for sd in job["file_sd_configs"]:
        for pattern in sd["files"]:
            for path in sorted(container.root.glob(pattern.lstrip("/"))):
                found += [t for group in yaml.safe_load(path.read_text()) for t in group["targets"]]
    return found


def test_prometheus_finds_the_agents_by_file_under_the_job_name_the_agent_alerts_select(stack):
    prom = stack["prometheus"]
    config = yaml.safe_load(prom.path(prom.flag("--config.file")).read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    rules = [r for p in assets.rule_files() for g in yaml.safe_load(p.read_text())["groups"] for r in g["rules"]]
    watched = {m.group(1) for r in rules for m in re.finditer(r'\bup\{[^}]*job=~?"([^"]+)"', r["expr"])}
    selectors = {s for s in watched if "agent" in s}
    assert selectors, "no alert watches the agents' up series any more: this test must learn the new selector"
    for selector in selectors:
        matching = [name for name in jobs if re.fullmatch(selector, name)]
        assert matching and all("file_sd_configs" in jobs[name] for name in matching), (selector, list(jobs))
    # FleetscopeCollectorDown's selector finds the collector's job, and only it
    (collector_selector,) = watched - selectors
    assert [name for name in jobs if re.fullmatch(collector_selector, name)] == ["fleetscope-collector"], list(jobs)
    # the example targets file holds this stack's own agent, at the port its service listens on
    services = compose()["services"]
    agent_jobs = [j for name, j in jobs.items() if any(re.fullmatch(s, name) for s in selectors)]
    assert "agent:9835" in [t for j in agent_jobs for t in _targets(j, prom)]
    assert "agent" in services
    assert [t for j in jobs.values() for sc in j.get("static_configs", []) for t in sc["targets"]] == ["collector:9837"]
    assert "9837" in " ".join(services["collector"]["command"])
    (alerting,) = [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert alerting == "alertmanager:9093" and "alertmanager" in services


def test_the_console_gets_the_alertmanager_url():
    services = compose()["services"]
    url = services["console"]["environment"]["FLEETSCOPE_ALERTMANAGER_URL"]
    assert url == "http://alertmanager:9093" and services["alertmanager"]["image"].startswith("prom/alertmanager:")
    # the variable the console's Findings page reads
    assert 'os.environ.get("FLEETSCOPE_ALERTMANAGER_URL")' in (ROOT / "dashboards/pages/4_Findings.py").read_text()
