"""Agents authenticate as themselves, against a real collector: per-agent tokens, boot epochs, the bound on
sequence jumps, HTTPS and mutual TLS (a throw-away CA from tests/security/certs.py)."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import sys
import time

import httpx
import pytest

from agent.shipper import Shipper
from fleetscope.schema import StepEvent
from tests.conftest import free_port, wait_until
from tests.security.certs import CA

READ = "identity-read"
TOKENS = "fleet-token\ntok-a gpu-a\ntok-b gpu-b\n"
NOW = time.time() - 60


def start_collector(procs, tmp_path, *, name: str = "collector", tokens: str = TOKENS, tls: list[str] = ()):
    port = free_port()
    token_file = tmp_path / f"{name}-ingest-tokens"
    token_file.write_text(tokens)
    token_file.chmod(0o600)
    proc = procs(name, [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                        "--data-dir", str(tmp_path / name), *tls],
                 {"FLEETSCOPE_INGEST_TOKEN_FILE": str(token_file), "FLEETSCOPE_READ_TOKEN": READ})
    proc.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    proc.port = port
    return proc


def client(ca=None, cert=None) -> httpx.Client:
    if ca is None:
        return httpx.Client(timeout=5)
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    return httpx.Client(timeout=5, verify=context)


def wait_healthy(proc, http: httpx.Client) -> None:
    def up():
        if proc.proc.poll() is not None:
            raise AssertionError(f"the collector exited:\n{proc.output()}")
        try:
            return http.get(proc.url + "/healthz").status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(up, what=proc.name, timeout=30)


def batch(seq: int, *, node: str = "gpu-a", agent: str | None = None, epoch: str = "boot-1", step: int | None = None,
          frame_node: str | None = None) -> bytes:
    out = {"v": 1, "agent_id": agent or f"{node}-0001", "seq": seq, "node": node, "sent_ts": NOW, "epoch": epoch,
           "events": [{"v": 1, "kind": "step", "job": f"job-{node}", "rank": 0, "world_size": 1,
                       "step": seq // 1024 if step is None else step, "ts": NOW, "duration_s": 0.5}]}
    if frame_node is not None:
        out["frames"] = [{"v": 1, "kind": "host", "node": frame_node, "ts": NOW}]
    return json.dumps(out).encode()


def post(http: httpx.Client, proc, body: bytes, token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return http.post(proc.url + "/v1/ingest", content=body, headers=headers)


def read(http: httpx.Client, proc, path: str) -> httpx.Response:
    return http.get(proc.url + path, headers={"Authorization": f"Bearer {READ}"})


def steps_ingested(http: httpx.Client, proc) -> float:
    text = read(http, proc, "/metrics").text
    line = next(line for line in text.splitlines() if line.startswith('fleetscope_collector_events_ingested_total{kind="step"}'))
    return float(line.split()[-1])


def job_steps(http: httpx.Client, proc, job: str) -> list[dict]:
    r = read(http, proc, f"/v1/jobs/{job}/steps")
    return r.json()["steps"] if r.status_code == 200 else []


@pytest.fixture
def plain(procs, tmp_path):
    proc = start_collector(procs, tmp_path)
    with client() as http:
        wait_healthy(proc, http)
        yield proc, http


# --- identity ----------------------------------------------------------------------------------------------------
def test_another_agents_token_cannot_silence_an_agent(plain):
    proc, http = plain
    assert post(http, proc, batch(0), "tok-a").status_code == 200
    # B, with its own token, posts as A, numbered 2**53: refused, and A's watermark does not move
    r = post(http, proc, batch(2**53, agent="gpu-a-0001", node="gpu-a"), "tok-b")
    assert r.status_code == 403, r.text
    r = post(http, proc, batch(2**53, agent="gpu-a-0001", node="gpu-b"), "tok-b")
    assert r.status_code == 403 and "agent_id" in r.text
    replies = [post(http, proc, batch(1024 * n), "tok-a") for n in range(1, 6)]
    assert [r.status_code for r in replies] == [200] * 5
    assert not any(r.json()["duplicate"] for r in replies)
    # every batch of A is stored exactly once
    assert steps_ingested(http, proc) == 6
    series = job_steps(http, proc, "job-gpu-a")
    assert [s["step"] for s in series] == [0, 1, 2, 3, 4, 5] and all(s["ranks"] == 1 for s in series)


def test_a_node_cannot_write_another_nodes_frames(plain):
    proc, http = plain
    r = post(http, proc, batch(0, node="gpu-b", frame_node="gpu-a"), "tok-b")  # a spoofed frame for gpu-a
    assert r.status_code == 403 and "frames[0]" in r.text
    assert post(http, proc, batch(0, node="gpu-a", frame_node="gpu-a"), "tok-b").status_code == 403
    assert post(http, proc, batch(0, node="gpu-b", frame_node="gpu-b"), "tok-b").status_code == 200
    nodes = [n["node"] for n in read(http, proc, "/v1/nodes").json()["nodes"]]
    assert "gpu-b" in nodes and "gpu-a" not in nodes


def test_a_restarted_agent_starts_a_new_epoch_and_loses_nothing(plain, tmp_path):
    proc, http = plain
    spool = tmp_path / "spool"

    def run_agent(first_step: int, before_send=None) -> Shipper:
        shipper = Shipper(proc.url, "tok-a", agent_id="gpu-a", node="gpu-a", spool_dir=spool)  # a fixed agent id
        for n in range(first_step, first_step + 5):
            shipper.enqueue_event(StepEvent(v=1, job="job-gpu-a", rank=0, world_size=1, step=n, ts=NOW + n, duration_s=0.5))
            shipper.spill()  # one batch each, on disk
        if before_send:
            before_send()
        while len(shipper.spool):
            assert shipper.send_once(), shipper.failures
        shipper.stop(drain_s=0)
        return shipper

    kept = tmp_path / "kept"
    first = run_agent(0, lambda: shutil.copytree(spool, kept))  # the spool as a crash would have left it
    # the next start finds a batch of the first epoch in its spool again: it goes first, and is a duplicate
    next(iter(sorted(kept.glob("*.batch")))).rename(spool / next(iter(sorted(kept.glob("*.batch")))).name)
    second = run_agent(5)
    assert first.epoch != second.epoch
    assert first.sent_events == 5 and second.sent_events == 5  # the resent old batch counted no event
    assert steps_ingested(http, proc) == 10
    assert [s["step"] for s in job_steps(http, proc, "job-gpu-a")] == list(range(10))


def test_a_sequence_jump_beyond_the_bound_is_refused(plain):
    proc, http = plain
    assert post(http, proc, batch(0), "tok-a").status_code == 200
    r = post(http, proc, batch(2**33), "tok-a")
    assert r.status_code == 422 and "more than the 4294967296 allowed" in r.text
    # a fleet token (identity from the body) is bounded the same way, even for an agent it has not seen
    assert post(http, proc, batch(2**53, node="gpu-z"), "fleet-token").status_code == 422
    r = post(http, proc, batch(1024), "tok-a")
    assert r.status_code == 200 and r.json()["duplicate"] is False
    assert post(http, proc, batch(0, node="gpu-z"), "fleet-token").status_code == 200


# --- TLS ---------------------------------------------------------------------------------------------------------
def start_agent(procs, tmp_path, name: str, url: str, settings: str, env: dict[str, str]):
    metrics_port, events_port = free_port(), free_port(socket.SOCK_DGRAM)
    config = tmp_path / f"{name}.toml"
    config.write_text(f"[agent]\n{settings}")
    config.chmod(0o600)
    proc = procs(f"agent-{name}", [sys.executable, "-m", "fleetscope", "agent", "--config", str(config), "--node", name,
                                   "--gpu-backend", "simulated", "--gpus", "2", "--interval", "0.5",
                                   "--metrics-address", f"127.0.0.1:{metrics_port}",
                                   "--events-address", f"127.0.0.1:{events_port}", "--spool-dir", str(tmp_path / f"spool-{name}"),
                                   "--collector-url", url], env)
    proc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return proc


def agent_metric(proc, name: str) -> float | None:
    try:
        text = httpx.get(proc.metrics_url, timeout=5).text
    except httpx.HTTPError:
        return None
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), None)


def nodes(http, proc) -> list[str]:
    return [n["node"] for n in read(http, proc, "/v1/nodes").json()["nodes"]]


def test_over_https_agents_verify_the_collector_and_plain_http_is_refused(procs, tmp_path):
    ca, other = CA(tmp_path / "ca"), CA(tmp_path / "other-ca", "impostor CA")
    cert, key = ca.issue("collector", server=True)
    proc = start_collector(procs, tmp_path, tls=["--tls-cert", str(cert), "--tls-key", str(key)])
    with client(ca.path) as http:
        wait_healthy(proc, http)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port: no answer but a failed handshake
            httpx.get(f"http://127.0.0.1:{proc.port}/healthz", timeout=5)
        token = {"FLEETSCOPE_INGEST_TOKEN": "tok-a"}
        good = start_agent(procs, tmp_path, "gpu-a", proc.url, f'ca_file = "{ca.path}"\n', token)
        bad = start_agent(procs, tmp_path, "gpu-b", proc.url, f'ca_file = "{other.path}"\n',
                          {"FLEETSCOPE_INGEST_TOKEN": "tok-b"})
        wait_until(lambda: "gpu-a" in nodes(http, proc), what="gpu-a's frames over HTTPS", timeout=30)
        # the agent that does not trust the collector's certificate sends nothing and keeps its batches on disk
        wait_until(lambda: (agent_metric(bad, "fleetscope_agent_shipper_spool_batches") or 0) >= 1,
                   what="the wrong-CA agent to spool", timeout=30)
        assert agent_metric(bad, "fleetscope_agent_shipper_batches_sent_total") == 0
        assert (agent_metric(bad, "fleetscope_agent_shipper_send_failures_total") or 0) >= 1
        assert "gpu-b" not in nodes(http, proc)
        assert "CERTIFICATE_VERIFY_FAILED" in bad.output() or "certificate verify failed" in bad.output()
        assert (agent_metric(good, "fleetscope_agent_shipper_batches_sent_total") or 0) >= 1


def test_with_mutual_tls_a_client_certificate_is_the_agents_identity(procs, tmp_path):
    ca = CA(tmp_path / "ca")
    cert, key = ca.issue("collector", server=True)
    a_cert = ca.issue("gpu-a")
    proc = start_collector(procs, tmp_path, tokens="tok-b gpu-b\n",
                           tls=["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca.path)])
    with client(ca.path) as anonymous, client(ca.path, a_cert) as as_a:
        wait_healthy(proc, anonymous)
        assert post(as_a, proc, batch(0, node="gpu-a")).status_code == 200  # no token: the certificate names it
        r = post(as_a, proc, batch(0, node="gpu-b"))
        assert r.status_code == 403 and "client certificate" in r.text
        r = post(as_a, proc, batch(0, node="gpu-b"), "tok-b")  # a certificate and a token for two nodes
        assert r.status_code == 403
        assert post(anonymous, proc, batch(0, node="gpu-a")).status_code == 401
        # an agent process with the certificate and no token ships as gpu-a
        agent = start_agent(procs, tmp_path, "gpu-a", proc.url,
                            f'ca_file = "{ca.path}"\ntls_cert = "{a_cert[0]}"\ntls_key = "{a_cert[1]}"\n', {})
        wait_until(lambda: (agent_metric(agent, "fleetscope_agent_shipper_batches_sent_total") or 0) >= 2,
                   what="the mTLS agent to ship", timeout=30)
        assert nodes(anonymous, proc) == ["gpu-a"]
