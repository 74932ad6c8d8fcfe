"""Agent configuration: a TOML file, overridden by command-line flags; the ingest token from a credential file."""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from fleetscope.secrets import load_private_toml, read_secret
from fleetscope.vocabulary import AGENT_EVENTS_PORT, AGENT_METRICS_PORT


@dataclass
class AgentConfig:
    node: str = field(default_factory=socket.gethostname)
    metrics_address: str = f"0.0.0.0:{AGENT_METRICS_PORT}"
    events_address: str = f"127.0.0.1:{AGENT_EVENTS_PORT}"
    interval_s: float = 5.0  # seconds between samples of every source (what /metrics serves and the collector gets)
    gpu_backend: str = "auto"  # auto | nvml | simulated | none
    gpus: int = 8  # simulated GPUs
    seed: int = 0
    scenario: str | None = None  # fault scenario file for simulated GPUs (agent/gpu/scenario.py)
    expected_gpus: int | None = None
    collector_url: str | None = None
    # Best left out of the file: $CREDENTIALS_DIRECTORY/ingest-token (systemd LoadCredential=), the file
    # $FLEETSCOPE_INGEST_TOKEN_FILE names, or $FLEETSCOPE_INGEST_TOKEN (fleetscope/secrets.py). A config file
    # that holds it must be private (mode 0600).
    collector_token: str | None = None
    # An https collector_url: its certificate is verified against ca_file (PEM; default: the system's CAs). A
    # collector serving mutual TLS takes tls_cert/tls_key (PEM) as this agent's identity (its common name must
    # be `node`), with or without a token.
    ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # A Prometheus web configuration file (exporter-toolkit's format, fleetscope/webconfig.py): TLS and/or basic auth
    # on the metrics port.
    web_config: str | None = None
    # Default: "<node>-<12 random hex digits>", new at each start. A collector that knows agents by their own token
    # or certificate takes only "<node>" or "<node>-<anything>" here.
    agent_id: str | None = None
    # Where unacknowledged batches wait while the collector is unreachable (systemd's StateDirectory
    # when it runs as a service); "" keeps them in memory only.
    spool_dir: str | None = None
    spool_bytes: int = 512 * 1024 * 1024  # the spool's size on disk; past it the oldest batches go, counted
    # Memory the shipper may hold while the collector is slow or away (events and the batches cut from them), and
    # the largest batch it posts (at most the collector's max_body_bytes).
    max_queue_bytes: int = 64 * 1024 * 1024
    max_batch_bytes: int = 4 * 1024 * 1024  # the largest batch posted; a larger one is split, never dropped
    # What one workload sender may send (per uid on the Unix socket, per address and port over UDP), each a token
    # bucket holding 2 s of its rate.
    events_per_sender: float = 5000.0
    bytes_per_sender: int = 4 * 1024 * 1024  # bytes a second one workload sender may send (as events_per_sender)
    disable_sources: list[str] = field(default_factory=list)  # sources not to run, by name (cpu, network, gpu, ...)
    compat: list[str] = field(default_factory=list)  # "dcgm": also emit dcgm-exporter's names
    exclude_interfaces: str = r"^lo$"  # a regular expression: network interfaces left out of the network source
    procfs: str = "/proc"  # roots, so a containerised agent can read the host's (/host/proc)
    sysfs: str = "/sys"  # read for InfiniBand, hwmon, NIC speeds (/host/sys in a container)
    rootfs: str = "/"  # the host's root, for filesystems and the kubelet's folders (/host in a container)
    labels: dict[str, str] = field(default_factory=dict)  # cluster, rack, ...: on fleetscope_node_info and frames
    # The kubelet's PodResources socket, for the pod, namespace and container holding each GPU (agent/kubernetes.py,
    # the `kubernetes` extra). Default: /var/lib/kubelet/pod-resources/kubelet.sock where it exists; "" for none.
    pod_resources_socket: str | None = None
    # Where deploy/slurm's prolog and epilog register the Slurm jobs on this node (agent/slurm.py); "" for none.
    slurm_state_dir: str = "/run/fleetscope-slurm"
    # [[agent.inference_servers]] url = "http://127.0.0.1:8000/metrics", kind = "vllm", service = "chat"
    inference_servers: list[dict] = field(default_factory=list)  # inference servers' /metrics to read each sample
    # Keep the agent's memory on 2 MiB pages (agent/hugepages.py): on a VM a sample after seconds of idleness pays
    # per 4 KiB page it touches. The agent starts its interpreter again, once, with glibc's malloc on huge pages and
    # one heap for all threads (PYTHONMALLOC=malloc, GLIBC_TUNABLES), and moves its long-lived heap onto huge pages
    # after start-up. false keeps pymalloc and the kernel's default small pages (so does a PYTHONMALLOC already set).
    huge_pages: bool = True
    # With huge_pages, also the interpreter's code (libpython's instructions and constants) on 2 MiB pages: copied
    # onto anonymous huge pages at the same addresses. Profilers that find the interpreter by its file in
    # /proc/<pid>/maps (py-spy, perf) then cannot read the agent: false keeps the code on the file's pages.
    huge_page_code: bool = True

    def __post_init__(self) -> None:
        if self.gpu_backend not in ("auto", "nvml", "simulated", "none"):
            raise ValueError(f"gpu_backend must be one of auto, nvml, simulated, none; got {self.gpu_backend!r}")
        unknown_compat = set(self.compat) - {"dcgm"}
        if unknown_compat:
            raise ValueError(f"compat must name only known exporters (dcgm); got {', '.join(sorted(unknown_compat))}")
        for key in self.labels:
            if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", key) or key.startswith("__"):
                raise ValueError(f"label {key!r} is not a Prometheus label name (letters, digits, _; not starting with __)")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key needs tls_cert (the client certificate it belongs to)")
        for name in ("ca_file", "tls_cert", "tls_key", "web_config"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name} {path} is not a readable file")
        for name in ("interval_s", "spool_bytes", "max_queue_bytes", "max_batch_bytes", "events_per_sender", "bytes_per_sender"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.collector_token is None:
            self.collector_token = read_secret("FLEETSCOPE_INGEST_TOKEN")
        if self.spool_dir is None:
            state = os.environ.get("STATE_DIRECTORY") or os.path.expanduser(f"~/.local/state/fleetscope/{self.node}")
            self.spool_dir = os.path.join(state.split(":")[0], "spool")
        if self.agent_id is None:
            # One id per agent process: with the batch sequence number it makes each batch unique.
            self.agent_id = f"{self.node}-{uuid.uuid4().hex[:12]}"

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: object) -> "AgentConfig":
        values: dict[str, object] = {}
        if path is not None:
            values.update(load_private_toml(path, "agent").get("agent", {}))
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{path}: unknown setting(s) in [agent]: {', '.join(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def split_address(address: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return (host or default_host, int(port))
    except ValueError:
        raise ValueError(f"address {address!r} is not host:port") from None
