"""Agent configuration: TOML plus flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.sources import build_sources

EXAMPLE = Path(__file__).resolve().parents[2] / "agent" / "systemd" / "agent.toml.example"


def test_the_shipped_example_loads_and_flags_override_it():
    config = AgentConfig.load(EXAMPLE, interval_s=1.0)
    assert config.expected_gpus == 8 and config.interval_s == 1.0
    # where to ship is the operator's to set: `fleetscope agent --config` refuses the file until it is
    assert config.collector_url is None and '# collector_url = "https://' in EXAMPLE.read_text()


def test_unknown_settings_and_bad_values_are_refused(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\ninterval = 5\n")
    with pytest.raises(ValueError, match="unknown setting.*interval"):
        AgentConfig.load(path)
    with pytest.raises(ValueError, match="gpu_backend"):
        AgentConfig(gpu_backend="cuda")


def test_sources_are_disabled_by_name():
    names = [s.name for s in build_sources(AgentConfig(gpu_backend="none", disable_sources=["storage", "network"]))]
    assert "storage" not in names and "network" not in names
    assert {"cpu", "gpu", "memory", "pressure", "infiniband", "hwmon"} <= set(names)
    with pytest.raises(ValueError, match="unknown source.*nope"):
        build_sources(AgentConfig(disable_sources=["nope"]))


def test_labels_must_be_prometheus_label_names():
    with pytest.raises(ValueError, match="not a Prometheus label name"):
        AgentConfig(labels={"rack-id": "r1"})
    assert AgentConfig(labels={"cluster": "a", "rack": "r12"}).labels == {"cluster": "a", "rack": "r12"}


def test_node_labels_are_an_info_metric_and_travel_in_frames():
    from prometheus_client import CollectorRegistry

    from agent.exporter import AgentCollector
    from agent.sampler import Sampler
    from agent.shipper import host_frame
    from agent.sources.cpu import CpuSource

    sampler = Sampler([CpuSource()])
    snapshot = sampler.sample_once()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sampler, labels={"rack": "r12", "cluster": "a"}))
    assert reg.get_sample_value("fleetscope_node_info", {"cluster": "a", "rack": "r12"}) == 1
    assert host_frame(snapshot, "n1", {"cluster": "a"}).labels == {"cluster": "a"}


def test_the_shipper_and_sender_limits_come_from_the_config(tmp_path):
    from agent.main import Agent

    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nmax_queue_bytes = 1048576\nmax_batch_bytes = 65536\nevents_per_sender = 10.0\n'
                    'bytes_per_sender = 4096\ncollector_url = "http://127.0.0.1:9"\ngpu_backend = "none"\n'
                    'metrics_address = "127.0.0.1:0"\nevents_address = "127.0.0.1:0"\n')
    path.chmod(0o600)
    agent = Agent(AgentConfig.load(path, collector_token="t", spool_dir=""))
    try:
        assert agent.listener.limits.events_per_s == 10.0 and agent.listener.limits.bytes_per_s == 4096
        assert agent.shipper.max_queue_bytes == 1048576 and agent.shipper.max_batch_bytes == 65536
    finally:
        agent.listener.stop()
        agent.sampler.stop()
    with pytest.raises(ValueError, match="max_queue_bytes must be positive"):
        AgentConfig(max_queue_bytes=0, gpu_backend="none")
