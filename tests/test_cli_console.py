"""`fleetscope dashboard` listens on loopback unless sign-in is on or --insecure is given."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleetscope.cli import main as cli
from tests.conftest import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[1]


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.append(address)
    return found


def test_by_default_the_console_listens_on_loopback_only(tmp_path):
    port = free_port()
    log = tmp_path / "console.log"
    proc = subprocess.Popen([sys.executable, "-m", "fleetscope", "dashboard", "--port", str(port),
                             "--collector-url", "http://127.0.0.1:9"], cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        addresses = wait_until(lambda: listening(port) or proc.poll() is not None, timeout=60, what="the console to listen")
        assert proc.poll() is None, log.read_text(errors="replace")
        assert addresses == ["0100007F"], addresses  # 127.0.0.1, and nothing else (not 0.0.0.0, not ::)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--server.address") + 1] == b"127.0.0.1"
    finally:
        stop_process(proc)


def test_another_address_without_sign_in_is_refused():
    result = subprocess.run([sys.executable, "-m", "fleetscope", "dashboard", "--address", "0.0.0.0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without sign-in" in result.stderr and "--insecure" in result.stderr


def test_oidc_without_its_settings_is_refused_and_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("FLEETSCOPE_OIDC_CLIENT_SECRET", raising=False)
    result = subprocess.run([sys.executable, "-m", "fleetscope", "dashboard", "--auth", "oidc", "--oidc-issuer",
                             "https://idp.example"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--oidc-client-id" in result.stderr and "--public-url" in result.stderr and "client secret" in result.stderr


@pytest.fixture
def exec_calls(monkeypatch):
    """What `fleetscope dashboard` would exec, instead of exec-ing it (which would replace the test process)."""
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    return calls


@pytest.mark.parametrize("address, extra, allowed", [
    ("127.0.0.1", [], True), ("::1", [], True), ("localhost", [], True), ("127.0.0.2", [], True),
    ("0.0.0.0", [], False), ("::", [], False), ("10.1.2.3", [], False), ("console.example.internal", [], False),
    ("", [], False), ("0.0.0.0", ["--insecure"], True),
])
def test_which_addresses_need_sign_in(address, extra, allowed, exec_calls):
    assert cli(["dashboard", "--address", address, *extra]) == (0 if allowed else 2)
    assert len(exec_calls) == (1 if allowed else 0)
    if allowed:
        argv, env = exec_calls[0]
        assert argv[argv.index("--server.address") + 1] == address and env["FLEETSCOPE_CONSOLE_AUTH"] == "none"


def test_the_console_gets_its_read_token_from_a_file_in_its_environment(tmp_path, monkeypatch, exec_calls):
    token = tmp_path / "read-token"
    token.write_text("r-token\n")
    monkeypatch.delenv("FLEETSCOPE_READ_TOKEN", raising=False)
    monkeypatch.setenv("FLEETSCOPE_READ_TOKEN_FILE", str(token))
    assert cli(["dashboard"]) == 0
    argv, env = exec_calls[0]
    assert env["FLEETSCOPE_READ_TOKEN"] == "r-token" and "FLEETSCOPE_READ_TOKEN_FILE" not in env
    assert not any("r-token" in arg for arg in argv)


def test_oidc_sign_in_may_listen_anywhere_and_its_secret_is_neither_in_argv_nor_env(tmp_path, monkeypatch):
    import tomllib

    import fleetscope.cli

    secret = tmp_path / "client-secret"
    secret.write_text("oidc-s3cret\n")
    monkeypatch.setenv("FLEETSCOPE_OIDC_CLIENT_SECRET_FILE", str(secret))
    runs = []  # what it would run as its child (see the test below for the real one)
    monkeypatch.setattr(fleetscope.cli, "_run_then_remove", lambda argv, env, folder: runs.append((argv, env, folder)) or 0)
    assert cli(["dashboard", "--address", "0.0.0.0", "--auth", "oidc", "--oidc-issuer", "https://idp.example",
                "--oidc-client-id", "console", "--public-url", "https://console.example"]) == 0
    argv, env, folder = runs[0]
    assert env["FLEETSCOPE_CONSOLE_AUTH"] == "oidc"
    assert not any("oidc-s3cret" in a for a in argv) and not any("oidc-s3cret" in v for v in env.values())
    settings = Path(argv[argv.index("--secrets.files") + 1])
    assert settings.parent == folder
    try:
        assert tomllib.loads(settings.read_text())["auth"]["client_secret"] == "oidc-s3cret"
        assert settings.stat().st_mode & 0o077 == 0
    finally:
        settings.unlink()
        settings.parent.rmdir()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_the_oidc_client_secret_leaves_no_file_behind_when_the_console_stops(tmp_path, stop):
    # The real command and a real Streamlit: its [auth] settings (the client secret) are in a file while it runs,
    # and gone once it stops, by systemd's SIGTERM or a Ctrl-C.
    port = free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    log = tmp_path / "console.log"
    proc = subprocess.Popen([sys.executable, "-m", "fleetscope", "dashboard", "--port", str(port), "--collector-url",
                             "http://127.0.0.1:9", "--auth", "oidc", "--oidc-issuer", "https://idp.example",
                             "--oidc-client-id", "console", "--public-url", f"http://127.0.0.1:{port}"], cwd=ROOT,
                            env=dict(os.environ, TMPDIR=str(scratch), FLEETSCOPE_OIDC_CLIENT_SECRET="oidc-s3cret"),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: listening(port) or proc.poll() is not None, timeout=60, what="the console to listen")
        assert proc.poll() is None, log.read_text(errors="replace")
        (held,) = scratch.glob("fleetscope-console-*/secrets.toml")
        assert "oidc-s3cret" in held.read_text()
        proc.send_signal(getattr(signal, stop))
        proc.wait(timeout=30)
        assert not listening(port)  # the console itself stopped, not only the command that started it
        assert list(scratch.iterdir()) == [], list(scratch.rglob("*"))
    finally:
        stop_process(proc)
