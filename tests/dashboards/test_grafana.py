"""Grafana dashboards as code: the committed JSON is what the builder writes; push uses Grafana's HTTP API."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from dashboards.grafana.build import main as build_main
from dashboards.grafana.build import panel_queries, render
from fleetscope.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dashboards_are_what_the_builder_writes():
    assert build_main(["--check"]) == 0, "run `python -m dashboards.grafana.build` and commit the result"


def test_every_dashboard_has_panels_variables_and_the_alert_annotation():
    files = render()
    assert {p.name for p in files} == {"fleet.json", "node.json", "training.json", "inference.json"}
    for path, text in files.items():
        doc = json.loads(text)
        assert panel_queries(text), path.name
        assert any(a.get("expr", "").startswith('ALERTS{alertstate="firing"') for a in doc["annotations"]["list"])
        for panel in doc["panels"]:
            targets = panel.get("targets", [])
            assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in targets)
            assert len({t["refId"] for t in targets}) == len(targets) and all(t["refId"] for t in targets), panel["title"]
    variables = {json.loads(t)["uid"]: [v["name"] for v in json.loads(t)["templating"].get("list", [])] for t in files.values()}
    assert variables["fleetscope-node"] == ["datasource", "cluster", "instance", "gpu"]
    assert variables["fleetscope-training"] == ["datasource", "cluster", "training_job"]
    assert variables["fleetscope-inference"] == ["datasource", "cluster", "service"]


def test_every_dashboard_reads_prometheus_or_victoriametrics_and_narrows_to_a_cluster():
    provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    by_uid = {d["uid"]: d for d in provisioned}
    assert by_uid["prometheus"]["url"] == "http://prometheus:9090"
    assert by_uid["victoriametrics"]["url"] == "http://victoriametrics:8428"
    for path, text in render().items():
        doc = json.loads(text)
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        # a data-source variable of the plugin type both sources share: each is one pick away on every dashboard
        assert variables["datasource"]["type"] == "datasource", path.name
        assert {d["type"] for d in provisioned} == {variables["datasource"]["query"]}
        assert variables["cluster"]["includeAll"] and variables["cluster"]["allValue"] == ".*", path.name
        annotation_sources = [a["datasource"]["uid"] for a in doc["annotations"]["list"] if "expr" in a]
        variable_sources = [v["datasource"]["uid"] for v in variables.values() if v["type"] == "query"]
        assert set(annotation_sources + variable_sources) == {"${datasource}"}, path.name
        for title, expr in panel_queries(text):
            assert 'cluster=~"$cluster"' in expr, (path.name, title)


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "./dashboards/grafana:/var/lib/grafana/dashboards/fleetscope:ro" in compose["services"]["grafana"]["volumes"]


def test_prometheus_remote_writes_to_the_compose_victoriametrics_with_its_cluster_label():
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    assert prometheus["global"]["external_labels"]["cluster"]
    assert [w["url"] for w in prometheus["remote_write"]] == ["http://victoriametrics:8428/api/v1/write"]
    vm = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["victoriametrics"]
    assert not vm["image"].endswith(":latest") and ":v1." in vm["image"]
    # on the stack's network only (tests/test_compose.py); Prometheus and Grafana reach it there
    assert "ports" not in vm and any(flag.startswith("-retentionPeriod=") for flag in vm["command"])


class FakeGrafana:
    """Grafana's folder and dashboard endpoints, recording what arrives (no Grafana package exists for this machine)."""

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.requests.append(("GET", self.path, self.headers.get("Authorization"), None))
                self._reply(200, [{"title": "other", "uid": "o1"}] if self.path.startswith("/api/folders") else {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(("POST", self.path, self.headers.get("Authorization"), body))
                if self.path == "/api/folders":
                    self._reply(200, {"uid": "f-fleetscope", "title": body["title"]})
                elif self.path == "/api/dashboards/db":
                    uid = body["dashboard"]["uid"]
                    self._reply(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x"})
                else:
                    self._reply(404, {"message": "not found"})

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


GRAFANA_PY = ROOT / ".venv-grafana" / "bin" / "python"


def test_push_creates_the_folder_and_overwrites_each_dashboard(tmp_path):
    import os
    import subprocess

    if not GRAFANA_PY.exists():
        message = "the grafana-client venv is missing (make test creates .venv-grafana)"
        if os.environ.get("FLEETSCOPE_REQUIRE_SYSTEM_DEPS"):
            raise AssertionError(message)
        import pytest

        pytest.skip(message)
    grafana = FakeGrafana()
    token = tmp_path / "grafana-token"
    token.write_text("glsa_test\n")
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_TOKEN"} | {"GRAFANA_TOKEN_FILE": str(token)}
    result = subprocess.run([str(GRAFANA_PY), "-m", "fleetscope", "dashboards", "push", "--url", grafana.url],
                            capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    posts = [(path, body) for method, path, auth, body in grafana.requests if method == "POST"]
    assert posts[0] == ("/api/folders", {"title": "fleetscope"})
    dashboards = [body for path, body in posts if path == "/api/dashboards/db"]
    assert sorted(d["dashboard"]["uid"] for d in dashboards) == [
        "fleetscope-fleet", "fleetscope-inference", "fleetscope-node", "fleetscope-training"]
    assert all(d["folderUid"] == "f-fleetscope" and d["overwrite"] for d in dashboards)
    assert {auth for _, _, auth, _ in grafana.requests} == {"Bearer glsa_test"}
    assert "pushed fleetscope / Fleet" in result.stdout


def test_push_without_a_token_says_so(capsys, monkeypatch):
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    monkeypatch.delenv("GRAFANA_TOKEN_FILE", raising=False)
    assert cli(["dashboards", "push", "--url", "http://127.0.0.1:1"]) == 2
    assert "token" in capsys.readouterr().err


def test_push_without_grafana_client_says_how_to_get_it(capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("grafana_client") is not None:
        import pytest

        pytest.skip("grafana-client is installed in this environment")
    monkeypatch.delenv("GRAFANA_TOKEN_FILE", raising=False)
    monkeypatch.setenv("GRAFANA_TOKEN", "t")
    assert cli(["dashboards", "push", "--url", "http://127.0.0.1:1"]) == 2
    assert "fleetscope[grafana]" in capsys.readouterr().err


def test_the_compose_file_follows_the_compose_specification():
    import jsonschema

    schema = json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]
    assert not errors, errors
    assert {"collector", "agent", "console", "prometheus", "alertmanager", "grafana", "victoriametrics"} <= set(compose["services"])
    for service in compose["services"].values():  # every file a service mounts is in the repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
