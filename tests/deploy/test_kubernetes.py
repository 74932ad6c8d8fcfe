"""deploy/kubernetes: every overlay renders, every object it renders is valid against the Kubernetes schemas
(offline, kubernetes-validate) or, for the Prometheus Operator's kinds, its CRDs' schemas (v0.93.0, in
fixtures/), and what it deploys is what the agent, collector and console need and no more."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
FIXTURES = Path(__file__).parent / "fixtures"
TARGETS = ["base", "overlays/gpu-cluster", "overlays/kube-prometheus-stack"]


@lru_cache(maxsize=None)
def _render(target: str) -> tuple:
    kubectl = require_binary("kubectl")
    result = subprocess.run([kubectl, "kustomize", str(KUBE / target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(target: str) -> list[dict]:
    return list(_render(target))


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


@lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in FIXTURES.glob("monitoring.coreos.com_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            schemas[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = \
                version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_is_valid_against_its_schema(target):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    for doc in render(target):
        what = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        crd = crd_schemas().get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            # A CRD's structural schema: unknown fields are pruned by the API server, so refuse them here.
            errors = [f"{e.message} at {'/'.join(map(str, e.path))}" for e in _validator(crd).iter_errors(doc)]
            assert not errors, f"{what}: {errors}"
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what}: {exc.message} at {'/'.join(map(str, exc.path))}")


def _validator(crd_schema: dict) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0's schema dialect is draft 4's; the schema itself is not checked against draft 4's
    # metaschema, whose "regex" format refuses Go's inline flags ("^(?i)...").
    return jsonschema.Draft4Validator(_closed(crd_schema))


def _closed(schema: dict) -> dict:
    """The schema with additionalProperties: false wherever it lists properties and says nothing else."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
            out["properties"] = {**out["properties"], **({"apiVersion": {}, "kind": {}, "metadata": {}}
                                                         if "apiVersion" in schema["properties"] else {})}
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def test_a_misspelt_field_is_caught():
    # The checks above can fail: a DaemonSet with a typo, and a PodMonitor with one.
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    agent = one(render("overlays/gpu-cluster"), "DaemonSet", "fleetscope-agent")
    agent["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(agent, latest_version(), strict=True)
    monitor = one(render("overlays/kube-prometheus-stack"), "PodMonitor", "fleetscope-agent")
    monitor["spec"]["podMetricsEndpoint"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        _validator(crd_schemas()[("monitoring.coreos.com/v1", "PodMonitor")]).validate(monitor)


def test_the_prometheus_rule_holds_exactly_the_rules_of_alerts():
    rules = yaml.safe_load((ROOT / "alerts" / "fleetscope.rules.yml").read_text())["groups"]
    rule = one(render("overlays/kube-prometheus-stack"), "PrometheusRule", "fleetscope")
    assert rule["spec"]["groups"] == rules
    assert rule["metadata"]["namespace"] == "fleetscope"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # the chart's default rule selector


def test_the_agent_runs_on_gpu_nodes_with_what_it_needs_and_no_more():
    docs = render("overlays/gpu-cluster")
    spec = one(docs, "DaemonSet", "fleetscope-agent")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["hostPID"] and spec["hostNetwork"] and spec["automountServiceAccountToken"] is False
    (agent,) = spec["containers"]
    security = agent["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] and security["capabilities"] == {"drop": ["ALL"], "add": ["SYSLOG"]}
    assert agent["resources"]["limits"] == {"cpu": "200m", "memory": "256Mi"}
    # nvidia.com/gpu is not requested: that would take a GPU from the workloads
    assert "nvidia.com/gpu" not in str(agent["resources"])
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    sock = mounts["pod-resources"]
    assert sock["mountPath"] == "/var/lib/kubelet/pod-resources" and sock["readOnly"]
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    for name in ("host-root", "kmsg", "config", "token"):
        assert mounts[name]["readOnly"], name
    writable = {n for n, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"events", "state", "tmp"}
    env = {e["name"]: e for e in agent["env"]}
    assert env["FLEETSCOPE_INGEST_TOKEN_FILE"]["value"] == "/run/secrets/fleetscope/ingest-token"
    assert volumes["token"]["secret"]["secretName"] == "fleetscope-tokens"
    assert "FLEETSCOPE_INGEST_TOKEN" not in env  # a token in the environment is readable in the pod spec


def test_the_agents_config_is_one_the_agent_takes(tmp_path):
    from agent.config import AgentConfig

    config_map = one(render("base"), "ConfigMap", next(d["metadata"]["name"] for d in render("base")
                                                       if d["kind"] == "ConfigMap"))
    path = tmp_path / "agent.toml"
    path.write_text(config_map["data"]["agent.toml"])
    config = AgentConfig.load(path, node="gpu-7")
    assert config.collector_url == "http://fleetscope-collector:9837"
    assert config.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    agent = one(render("base"), "DaemonSet", "fleetscope-agent")["spec"]["template"]["spec"]
    assert any(v.get("configMap", {}).get("name") == config_map["metadata"]["name"] for v in agent["volumes"])
    # the collector's Service is what collector_url names
    assert one(render("base"), "Service", "fleetscope-collector")["spec"]["ports"][0]["port"] == 9837


def test_the_collector_keeps_its_data_on_a_volume_and_the_console_is_reached_by_port_forward_only():
    docs = render("overlays/gpu-cluster")
    collector = one(docs, "StatefulSet", "fleetscope-collector")["spec"]
    assert collector["replicas"] == 1
    (claim,) = collector["volumeClaimTemplates"]
    (container,) = collector["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/lib/fleetscope"} in container["volumeMounts"]
    assert container["args"][container["args"].index("--data-dir") + 1] == "/var/lib/fleetscope"
    console = one(docs, "Deployment", "fleetscope-console")["spec"]["template"]["spec"]["containers"][0]
    args = console["args"]
    # no sign-in: loopback only, no --insecure, and no Service that would publish it
    assert args[args.index("--address") + 1] == "127.0.0.1" and "--insecure" not in args
    assert not [d for d in docs if d["kind"] == "Service" and "console" in d["metadata"]["name"]]


def test_the_image_is_a_kustomize_image_the_overlay_names():
    images = {c["image"] for d in render("overlays/kube-prometheus-stack") if d["kind"] in ("DaemonSet", "StatefulSet", "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/fleetscope:0.1.0"}


def test_a_full_disk_neither_restarts_the_collector_nor_takes_its_reads_away():
    """Liveness on /livez (alive while it replays its WAL and while its disk is full: a restart frees no disk),
    readiness on /readyz (the console's reads keep reaching it while ingest answers 503); both routes exist."""
    from collector.api.routes.health import router

    (container,) = one(render("overlays/gpu-cluster"), "StatefulSet", "fleetscope-collector")["spec"]["template"]["spec"]["containers"]
    probes = {kind: container[kind]["httpGet"]["path"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    assert set(probes.values()) <= {route.path for route in router.routes}


def test_the_kube_prometheus_stack_values_remote_write_to_victoriametrics_with_the_cluster_label():
    """The chart's Prometheus (owned by Helm, not by the overlay) is told where the site's VictoriaMetrics is and
    which cluster it is, in the chart's own value names (prometheus.prometheusSpec, the Prometheus CR's fields)."""
    values = yaml.safe_load((KUBE / "overlays" / "kube-prometheus-stack" / "values-victoriametrics.yaml").read_text())
    spec = values["prometheus"]["prometheusSpec"]
    assert spec["externalLabels"]["cluster"]
    (write,) = spec["remoteWrite"]
    assert write["url"].endswith("/api/v1/write")  # VictoriaMetrics' Prometheus remote-write endpoint
    # the fields are the Prometheus CR's RemoteWriteSpec (the CRD schema the rendering test validates against)
    # (the fixture: prometheus-operator 0.93.0's example/prometheus-operator-crd/monitoring.coreos.com_prometheuses.yaml)
    spec_schema = crd_schemas()[("monitoring.coreos.com/v1", "Prometheus")]["properties"]["spec"]["properties"]
    remote = spec_schema["remoteWrite"]["items"]["properties"]
    assert set(write) <= set(remote) and set(write["queueConfig"]) <= set(remote["queueConfig"]["properties"])
    assert "externalLabels" in spec_schema
