"""Agent configuration: TOML plus flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.sources import build_sources

EXAMPLE = Path(__file__).resolve().parents[2] / "agent" / "systemd" / "agent.toml.example"


def test_the_shipped_example_loads_and_flags_override_it():
    config = AgentConfig.load(EXAMPLE, interval_s=1.0)
    assert config.collector_url.endswith(":9837") and config.expected_gpus == 8 and config.interval_s == 1.0


def test_unknown_settings_and_bad_values_are_refused(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\ninterval = 5\n")
    with pytest.raises(ValueError, match="unknown setting.*interval"):
        AgentConfig.load(path)
    with pytest.raises(ValueError, match="gpu_backend"):
        AgentConfig(gpu_backend="cuda")


def test_sources_are_disabled_by_name():
    names = [s.name for s in build_sources(AgentConfig(gpu_backend="none", disable_sources=["storage", "network"]))]
    assert names == ["cpu", "gpu", "memory"]
    with pytest.raises(ValueError, match="unknown source.*nope"):
        build_sources(AgentConfig(disable_sources=["nope"]))
