"""The agent's .deb, as a platform engineer meets it: built (make package's script), installed, run, verified, purged."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import free_port, http_get, stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]
PREFIX = Path("/opt/fleetscope")
UNIT = Path("/lib/systemd/system/fleetscope-agent.service")
CONFIG = Path("/etc/fleetscope/agent.toml")
WANTS = Path("/etc/systemd/system/multi-user.target.wants/fleetscope-agent.service")


def installed() -> bool:
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "fleetscope-agent"], capture_output=True, text=True)
    return status.returncode == 0 and "installed" in status.stdout.split()


@pytest.fixture
def machine():
    """This machine, when the test may install a package on it, one run at a time."""
    if os.geteuid() != 0:
        pytest.skip("installing a .deb needs root (dpkg -i); run make test as root")
    for tool in ("dpkg", "dpkg-deb", "systemd-analyze", "adduser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: make test installs it as root)")
    if not os.access("/usr/bin/python3.11", os.X_OK):
        pytest.skip("/usr/bin/python3.11, which the package runs on, is not installed")
    if sys.version_info[:2] != (3, 11):
        pytest.skip(f"the package's dependencies are copied from this Python ({sys.version.split()[0]}); its "
                    "environment runs on Debian's python3.11, so they must come from a 3.11 (make test's .venv)")
    with open("/run/lock/fleetscope-debian-package-test.lock" if os.path.isdir("/run/lock") else "/tmp/fleetscope-deb.lock",
              "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another checkout's run installs the same package
        if installed() or PREFIX.exists():
            pytest.skip(f"fleetscope-agent (or {PREFIX}) is already on this machine; this test installs and purges its "
                        "own and leaves that one alone (dpkg --purge fleetscope-agent to let it run)")
        try:
            yield
        finally:
            if installed():
                subprocess.run(["dpkg", "--purge", "fleetscope-agent"], capture_output=True)


def test_the_package_installs_runs_the_agent_once_configured_and_purges_clean(machine, tmp_path):
    built = subprocess.run([sys.executable, str(REPO / "deploy" / "debian" / "build.py"), "--out", str(tmp_path / "dist")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    [deb] = (tmp_path / "dist").glob("fleetscope-agent_*_*.deb")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    assert deb.name == f"fleetscope-agent_{version}_{arch}.deb"
    conffiles = subprocess.run(["dpkg-deb", "--info", str(deb), "conffiles"], capture_output=True, text=True, check=True)
    assert conffiles.stdout.split() == [str(CONFIG)]

    setup = subprocess.run(["dpkg", "-i", str(deb)], capture_output=True, text=True)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    # enabled, not started: it says what to configure first
    assert WANTS.is_symlink() and WANTS.resolve() == UNIT.resolve()
    assert "enabled, not started: set collector_url in /etc/fleetscope/agent.toml" in setup.stderr, setup.stderr
    assert subprocess.run(["getent", "passwd", "fleetscope"], capture_output=True).returncode == 0
    assert CONFIG.read_text() == (REPO / "agent" / "systemd" / "agent.toml.example").read_text()

    # The installed command, outside the checkout, with none of the test environment's Python paths.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("FLEETSCOPE_")}
    agent = [str(PREFIX / "bin" / "fleetscope"), "agent", "--config", str(CONFIG), "--gpu-backend", "none",
             "--interval", "0.5", "--metrics-address", f"127.0.0.1:{free_port()}",
             "--events-address", f"127.0.0.1:{free_port()}", "--spool-dir", str(tmp_path / "spool")]
    refused = subprocess.run(agent, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{CONFIG} sets no collector_url" in refused.stderr, refused.stderr

    metrics_url = f"http://{agent[agent.index('--metrics-address') + 1]}/metrics"
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        # a collector that is not there: the agent spools and serves /metrics all the same
        proc = subprocess.Popen([*agent, "--collector-url", f"http://127.0.0.1:{free_port()}"], cwd=tmp_path,
                                env={**env, "FLEETSCOPE_INGEST_TOKEN": "deb-test-token"}, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: proc.poll() is not None or b"fleetscope_agent_source_up" in http_get(metrics_url)[1],
                       timeout=30, what="the installed agent's /metrics")
            assert proc.poll() is None, log.read_text(errors="replace")
        finally:
            stop_process(proc)

    for command, source in ((["rules"], REPO / "alerts" / "fleetscope.rules.yml"), (["agent", "print-unit"], UNIT)):
        handed = subprocess.run([str(PREFIX / "bin" / "fleetscope"), *command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, check=True)
        assert handed.stdout == source.read_text(), command

    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(UNIT)], capture_output=True, text=True)
    output = verify.stdout + verify.stderr
    assert verify.returncode == 0, output
    for complaint in ("Unknown key", "nvalid", "Failed to parse", "ignoring"):
        assert complaint not in output, output

    purge = subprocess.run(["dpkg", "--purge", "fleetscope-agent"], capture_output=True, text=True)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert "not empty so not removed" not in purge.stderr.replace("directory '/opt' not empty", ""), purge.stderr
    left = [str(p) for p in (PREFIX, CONFIG, CONFIG.parent, UNIT, WANTS) if p.exists() or p.is_symlink()]
    assert not left and not installed(), left
