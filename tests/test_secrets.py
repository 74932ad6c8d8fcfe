"""Tokens come from credential files or the environment, never the command line; config files holding one stay private."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.config import AgentConfig
from fleetscope.cli import main as cli
from fleetscope.secrets import SecretError, read_secret, read_secrets
from tests.conftest import free_port, stop_process, wait_until

TOKEN = "s3cret-ingest-7f1c"


@pytest.fixture(autouse=True)
def no_tokens_in_env(monkeypatch):
    for name in ("FLEETSCOPE_INGEST_TOKEN", "FLEETSCOPE_READ_TOKEN", "GRAFANA_TOKEN", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_token_comes_from_the_file_its_FILE_variable_names(tmp_path):
    path = secret_file(tmp_path / "ingest-token", TOKEN + "\n")  # echo's newline is not part of it
    assert read_secret("FLEETSCOPE_INGEST_TOKEN", {"FLEETSCOPE_INGEST_TOKEN_FILE": str(path)}) == TOKEN
    assert read_secret("FLEETSCOPE_INGEST_TOKEN", {"FLEETSCOPE_INGEST_TOKEN": TOKEN}) == TOKEN  # the plain variable still works
    assert read_secret("FLEETSCOPE_INGEST_TOKEN", {}) is None


def test_a_token_file_that_cannot_be_used_is_an_error_naming_it(tmp_path):
    with pytest.raises(SecretError, match=f"cannot read {tmp_path / 'missing'}"):
        read_secret("FLEETSCOPE_READ_TOKEN", {"FLEETSCOPE_READ_TOKEN_FILE": str(tmp_path / "missing")})
    empty = secret_file(tmp_path / "empty", "\n")
    with pytest.raises(SecretError, match="is empty"):
        read_secret("FLEETSCOPE_READ_TOKEN", {"FLEETSCOPE_READ_TOKEN_FILE": str(empty)})
    with pytest.raises(SecretError, match="both FLEETSCOPE_READ_TOKEN and FLEETSCOPE_READ_TOKEN_FILE"):
        read_secret("FLEETSCOPE_READ_TOKEN", {"FLEETSCOPE_READ_TOKEN": "a", "FLEETSCOPE_READ_TOKEN_FILE": str(empty)})


def test_a_systemd_credential_wins_and_holds_several_tokens(tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret_file(creds / "ingest-token", "old-token\nnew-token\n")  # two at once while agents move to the new one
    env = {"CREDENTIALS_DIRECTORY": str(creds), "FLEETSCOPE_INGEST_TOKEN": "from-env"}
    assert read_secrets("FLEETSCOPE_INGEST_TOKEN", env) == {"old-token", "new-token"}
    # a credential the unit does not load falls back to the environment
    assert read_secret("FLEETSCOPE_READ_TOKEN", {**env, "FLEETSCOPE_READ_TOKEN": "r"}) == "r"


def test_the_agent_reads_its_token_from_the_credentials_directory(tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret_file(creds / "ingest-token", TOKEN)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert AgentConfig(gpu_backend="none").collector_token == TOKEN


def test_a_config_file_holding_a_token_must_not_be_readable_by_others(tmp_path):
    path = secret_file(tmp_path / "agent.toml", f'[agent]\ncollector_token = "{TOKEN}"\n', 0o644)
    with pytest.raises(ValueError) as refused:
        AgentConfig.load(path)
    message = str(refused.value)
    assert str(path) in message and "0644" in message and f"chmod 600 {path}" in message
    assert TOKEN not in message
    path.chmod(0o600)
    assert AgentConfig.load(path).collector_token == TOKEN
    public = secret_file(tmp_path / "public.toml", '[agent]\ninterval_s = 2.0\n', 0o644)  # no token: any mode
    assert AgentConfig.load(public).interval_s == 2.0


def test_the_agent_command_names_the_refused_config_file(tmp_path, capsys):
    path = secret_file(tmp_path / "agent.toml", f'[agent]\ncollector_token = "{TOKEN}"\n', 0o640)
    assert cli(["agent", "--config", str(path), "--gpu-backend", "none"]) == 2
    err = capsys.readouterr().err
    assert f"fleetscope agent: {path}" in err and "0640" in err and "chmod 600" in err


def test_the_collector_refuses_a_readable_config_file_holding_a_token(tmp_path, capsys):
    path = secret_file(tmp_path / "collector.toml", '[collector]\ningest_tokens = "x"\n', 0o604)
    assert cli(["collector", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "0604" in err and "chmod 600" in err


def test_the_collector_takes_its_tokens_from_files(tmp_path, monkeypatch):
    import collector.main

    started = {}
    monkeypatch.setattr(collector.main, "run", lambda settings, host, port, **limits: started.update(settings=settings))
    monkeypatch.setenv("FLEETSCOPE_INGEST_TOKEN_FILE", str(secret_file(tmp_path / "ingest", "a1, a2\n")))
    monkeypatch.setenv("FLEETSCOPE_READ_TOKEN_FILE", str(secret_file(tmp_path / "read", "r1\n")))
    assert cli(["collector", "--data-dir", str(tmp_path / "data")]) == 0
    assert started["settings"].ingest_tokens == {"a1", "a2"} and started["settings"].read_tokens == {"r1"}


def test_without_tokens_the_collector_says_where_to_put_them(tmp_path, capsys):
    assert cli(["collector", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "FLEETSCOPE_INGEST_TOKEN_FILE" in err and "LoadCredential=ingest-token" in err


@pytest.mark.parametrize("argv, replacement", [
    (["agent", "--collector-token", TOKEN], "FLEETSCOPE_INGEST_TOKEN_FILE"),
    (["agent", f"--collector-token={TOKEN}"], "FLEETSCOPE_INGEST_TOKEN_FILE"),
    (["collector", "--ingest-token", TOKEN], "FLEETSCOPE_INGEST_TOKEN_FILE"),
    (["collector", "--read-token", TOKEN], "FLEETSCOPE_READ_TOKEN_FILE"),
    (["dashboards", "push", "--token", TOKEN], "GRAFANA_TOKEN_FILE"),
])
def test_a_token_on_the_command_line_is_refused_with_what_to_use_instead(argv, replacement, capsys):
    with pytest.raises(SystemExit) as exited:
        cli(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "no longer accepted" in err and "visible to every user" in err and replacement in err and "replace it" in err


class FakeCollector:
    """Records the Authorization header of each ingest post."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.authorizations.append(self.headers.get("Authorization", ""))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_the_running_agent_uses_the_token_file_and_no_user_can_see_the_token(tmp_path):
    fake = FakeCollector()
    token_file = secret_file(tmp_path / "ingest-token", TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCOPE_") and k != "CREDENTIALS_DIRECTORY"}
    env["FLEETSCOPE_INGEST_TOKEN_FILE"] = str(token_file)
    proc = subprocess.Popen([sys.executable, "-m", "fleetscope", "agent", "--gpu-backend", "none", "--interval", "0.5",
                             "--metrics-address", f"127.0.0.1:{free_port()}", "--events-address", f"127.0.0.1:{free_port()}",
                             "--collector-url", fake.url, "--spool-dir", str(tmp_path / "spool")],
                            env=env, stdout=(tmp_path / "agent.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: fake.authorizations or proc.poll() is not None, timeout=30, what="the agent's first batch")
        assert proc.poll() is None, (tmp_path / "agent.log").read_text(errors="replace")
        assert fake.authorizations[0] == f"Bearer {TOKEN}"  # the file's token is the one that is used ...
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"agent" in cmdline and TOKEN.encode() not in cmdline  # ... and is in neither its command line ...
        assert TOKEN.encode() not in environ  # ... nor its environment
        ps = subprocess.run(["ps", "-eo", "pid,args", "--width", "4096"], capture_output=True, text=True).stdout
        assert str(proc.pid) in ps and TOKEN not in ps
    finally:
        stop_process(proc)
        fake.httpd.shutdown()
