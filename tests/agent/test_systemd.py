"""The shipped systemd unit is valid and keeps the agent unprivileged."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "agent" / "systemd" / "fleetscope-agent.service"


def service() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    # systemd allows repeated keys; configparser does not, so collect them by hand
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_agent_runs_as_its_own_user_on_a_read_only_system():
    s = service()
    # the package's system user where it exists, else a dynamic one of that name: never root either way
    assert s["DynamicUser"] == ["yes"] and s["User"] == ["fleetscope"]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    # one capability only: CAP_SYSLOG, to read XIDs from /dev/kmsg under kernel.dmesg_restrict=1
    assert s["CapabilityBoundingSet"] == ["CAP_SYSLOG"] and s["AmbientCapabilities"] == ["CAP_SYSLOG"]
    assert s["DevicePolicy"] == ["closed"] and "/dev/kmsg r" in s["DeviceAllow"]
    assert "ProtectKernelLogs" not in s  # it would take CAP_SYSLOG away and hide /dev/kmsg
    assert "/dev/nvidiactl rw" in s["DeviceAllow"] and "char-nvidia-frontend rw" in s["DeviceAllow"]
    assert s["ExecStart"][0].endswith("fleetscope agent --config /etc/fleetscope/agent.toml")


def test_the_token_is_a_credential_and_the_agent_is_bounded_and_fenced():
    s = service()
    assert s["LoadCredential"] == ["ingest-token:/etc/fleetscope/ingest-token"]
    assert "--collector-token" not in s["ExecStart"][0]
    assert s["UMask"] == ["0077"]  # the spool is the agent's alone
    assert 0 < int(s["TasksMax"][0]) <= 256 and 0 < int(s["LimitNOFILE"][0]) <= 65536
    # loopback only until the operator allows the collector and the scrapers (a commented line says how)
    assert s["IPAddressDeny"] == ["any"] and s["IPAddressAllow"] == ["localhost"]
    lines = UNIT.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#IPAddressAllow="))
    assert "collector" in lines[first - 1]
    text = "\n".join(lines)
    # why ProtectKernelLogs is absent is written down where someone would add it
    assert "ProtectKernelLogs=yes is left out on purpose" in text


def test_the_example_config_keeps_the_token_out():
    example = UNIT.parent / "agent.toml.example"
    for line in example.read_text().splitlines():
        assert not line.lstrip("# ").startswith("collector_token"), line
    assert "/etc/fleetscope/ingest-token" in example.read_text()


def test_systemd_analyze_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart to exist: point it at a stand-in executable.
    fake = tmp_path / "fleetscope"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/fleetscope/bin/fleetscope", str(fake)))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for complaint in ("Unknown key", "nvalid", "Failed to parse", "ignoring"):
        assert complaint not in result.stdout + result.stderr, result.stdout + result.stderr
