"""The Prometheus web config: its parser, and the agent's /metrics behind TLS and basic auth on real sockets."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import time

import pytest

from agent.exposition import MetricsServer
from fleetscope.webconfig import WebConfigError, load_web_config, parse_web_config
from tests.security.certs import CA

bcrypt = pytest.importorskip("bcrypt")

BODY = b"# HELP up_test a test\n# TYPE up_test gauge\nup_test 1\n"
PASSWORD = "s3cret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")  # htpasswd writes $2y$


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CA(folder)
    cert, key = ca.issue("agent", server=True)
    client_cert, client_key = ca.issue("prometheus")
    return ca, cert, key, client_cert, client_key


def write(tmp_path, text: str):
    path = tmp_path / "web.yml"
    path.write_text(text)
    return path


def test_a_full_file_is_read_with_paths_relative_to_it(tmp_path, pki):
    ca, cert, key, _, _ = pki
    (tmp_path / "tls").mkdir()
    for src in (cert, key, ca.path):
        (tmp_path / "tls" / src.name).write_bytes(src.read_bytes())
    path = write(tmp_path, f"""
tls_server_config:
  cert_file: tls/{cert.name}
  key_file: tls/{key.name}
  client_ca_file: tls/{ca.path.name}
  client_auth_type: RequireAndVerifyClientCert
  min_version: TLS13
basic_auth_users:
  prometheus: {HASH}
""")
    config = load_web_config(path)
    assert config.tls.cert_file == tmp_path / "tls" / cert.name
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert config.ssl_context().minimum_version == ssl.TLSVersion.TLSv1_3
    assert config.ssl_context().verify_mode == ssl.CERT_REQUIRED
    assert config.basic_auth_users == {"prometheus": HASH}


@pytest.mark.parametrize("text, named", [
    ("tls_server_confg:\n  cert_file: a\n", "'tls_server_confg'"),
    ("basic_auth_users: {}\nrate_limit: {interval: 1s, burst: 2}\n", "rate_limit is not supported"),
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  ciphers: [x]\n", "'ciphers'"),
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  cipher_suites: [x]\n", "cipher_suites is not supported"),
])
def test_an_unknown_or_unsupported_key_is_refused_by_name(tmp_path, text, named):
    with pytest.raises(WebConfigError, match=named):
        parse_web_config(text, tmp_path / "web.yml")


def test_missing_files_are_named(tmp_path, pki):
    _, cert, _, _, _ = pki
    with pytest.raises(WebConfigError, match=r"key_file .*nope\.key is not a readable file"):
        parse_web_config(f"tls_server_config:\n  cert_file: {cert}\n  key_file: nope.key\n", tmp_path / "web.yml")
    with pytest.raises(WebConfigError, match="key_file is required"):
        parse_web_config(f"tls_server_config:\n  cert_file: {cert}\n", tmp_path / "web.yml")
    with pytest.raises(WebConfigError, match="cannot read it"):
        load_web_config(tmp_path / "absent.yml")


def test_a_key_that_does_not_match_the_certificate_is_refused_at_load(tmp_path, pki):
    ca, cert, _, _, client_key = pki
    path = write(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {client_key}\n")
    with pytest.raises(WebConfigError, match="cannot load cert_file"):
        load_web_config(path)


@pytest.mark.parametrize("hashed", ["s3cret", "$2y$10$short", "{SHA}abc="])
def test_a_password_that_is_not_a_bcrypt_hash_is_refused(tmp_path, hashed):
    with pytest.raises(WebConfigError, match="'prometheus' is not a bcrypt hash"):
        parse_web_config(f"basic_auth_users:\n  prometheus: '{hashed}'\n", tmp_path / "web.yml")


def test_client_auth_settings_are_checked_as_exporter_toolkit_does(tmp_path, pki):
    ca, cert, key, _, _ = pki
    base = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    with pytest.raises(WebConfigError, match="client_auth_type is NoClientCert"):
        parse_web_config(base + f"  client_ca_file: {ca.path}\n", tmp_path / "w.yml")
    with pytest.raises(WebConfigError, match="needs client_ca_file"):
        parse_web_config(base + "  client_auth_type: RequireAndVerifyClientCert\n", tmp_path / "w.yml")
    with pytest.raises(WebConfigError, match="'Sometimes' is not one of"):
        parse_web_config(base + "  client_auth_type: Sometimes\n", tmp_path / "w.yml")
    with pytest.raises(WebConfigError, match="min_version 'TLS14'"):
        parse_web_config(base + "  min_version: TLS14\n", tmp_path / "w.yml")


# Real sockets: the agent's MetricsServer.

def serve(tmp_path, text: str) -> MetricsServer:
    config = load_web_config(write(tmp_path, text))
    server = MetricsServer("127.0.0.1", 0, lambda: BODY, lambda: None, ssl_context=config.ssl_context(),
                           basic_auth=config.basic_auth(), connection_timeout_s=2)
    server.start()
    return server


@pytest.fixture
def servers():
    started: list[MetricsServer] = []
    yield started
    for server in started:
        server.stop()


def https_get(server, ca, *, auth: tuple[str, str] | None = None, client: tuple | None = None):
    context = ssl.create_default_context(cafile=str(ca.path))
    if client:
        context.load_cert_chain(*client)
    conn = http.client.HTTPSConnection("127.0.0.1", server.address[1], context=context, timeout=5)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_an_https_scrape_with_the_right_ca_works_and_plain_http_fails(tmp_path, pki, servers):
    ca, cert, key, _, _ = pki
    server = serve(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    servers.append(server)
    status, _, body = https_get(server, ca)
    assert (status, body) == (200, BODY)
    other = CA(tmp_path / "other", "another CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(server, other)
    conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=5)
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/metrics")
        conn.getresponse()
    conn.close()
    assert https_get(server, ca)[2] == BODY  # the refused plain request left the server serving


def test_a_client_certificate_is_required_when_configured(tmp_path, pki, servers):
    ca, cert, key, client_cert, client_key = pki
    server = serve(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                             f"  client_ca_file: {ca.path}\n  client_auth_type: RequireAndVerifyClientCert\n")
    servers.append(server)
    assert https_get(server, ca, client=(client_cert, client_key))[0] == 200
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        https_get(server, ca)


def test_basic_auth_a_wrong_password_gets_401_the_right_one_200(tmp_path, pki, servers):
    ca, cert, key, _, _ = pki
    server = serve(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                             f"basic_auth_users:\n  prometheus: {HASH}\n")
    servers.append(server)
    status, headers, _ = https_get(server, ca)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert https_get(server, ca, auth=("prometheus", "wrong"))[0] == 401
    assert https_get(server, ca, auth=("grafana", PASSWORD))[0] == 401
    assert https_get(server, ca, auth=("prometheus", PASSWORD))[:3:2] == (200, BODY)
    assert https_get(server, ca, auth=("prometheus", PASSWORD))[0] == 200  # from the cache of verified passwords
    assert https_get(server, ca, auth=("prometheus", "wrong"))[0] == 401  # ... which holds only right ones


def test_basic_auth_without_tls(tmp_path, servers):
    server = serve(tmp_path, f"basic_auth_users:\n  prometheus: {HASH}\n")
    servers.append(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=5)
    conn.request("GET", "/metrics")
    assert conn.getresponse().status == 401
    conn.close()


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_a_stalled_handshake_costs_a_socket_not_the_reader(tmp_path, pki, servers):
    """Clients that connect and never finish (or start) a TLS handshake: a scrape is still answered at once, and
    the stalled ones are closed at the connection deadline."""
    ca, cert, key, _, _ = pki
    server = serve(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    servers.append(server)
    stalled = [socket.create_connection(server.address[:2]) for _ in range(20)]
    stalled[0].sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    started = time.monotonic()
    assert https_get(server, ca)[0] == 200
    assert time.monotonic() - started < 1.5
    for sock in stalled:
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed by the server at its 2 s deadline
        sock.close()


# The collector: the web config's basic auth guards its /metrics; its TLS is the server's own.

def test_the_collectors_metrics_take_the_password_or_a_read_token(tmp_path):
    from fastapi.testclient import TestClient

    from collector.api import create_app
    from collector.settings import Settings

    web = write(tmp_path, f"basic_auth_users:\n  prometheus: {HASH}\n")
    settings = Settings(data_dir=tmp_path / "data", ingest_tokens=frozenset({"ingest-t"}), read_tokens=frozenset({"read-t"}),
                        web_config=web)
    with TestClient(create_app(settings)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert client.get("/metrics", auth=("prometheus", "wrong")).status_code == 401
        assert client.get("/metrics", auth=("prometheus", PASSWORD)).status_code == 200
        assert client.get("/metrics", headers={"Authorization": "Bearer read-t"}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": "Bearer ingest-t"}).status_code == 403


def test_the_collector_refuses_tls_from_both_the_web_config_and_its_flags(tmp_path, pki):
    from collector.settings import Settings

    ca, cert, key, _, _ = pki
    web = write(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    common = dict(data_dir=tmp_path / "data", ingest_tokens=frozenset({"i"}), read_tokens=frozenset({"r"}), web_config=web)
    with pytest.raises(ValueError, match="tls_server_config and tls_cert is set too"):
        Settings(tls_cert=cert, tls_key=key, **common)
    assert Settings(**common).tls_cert == cert  # alone, the web config's certificate is the server's
