"""fleetscope.certs: the throw-away CA the demo serves HTTPS with, and the TLS tests use."""

from __future__ import annotations

import ipaddress
import ssl
import stat
import threading

import pytest

pytest.importorskip("cryptography")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from fleetscope.certs import CA  # noqa: E402


def test_the_ca_signs_a_server_certificate_for_127_0_0_1_and_localhost(tmp_path):
    ca = CA(tmp_path)
    crt, key = ca.issue("collector", server=True)
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.path.read_bytes())

    assert cert.issuer == ca_cert.subject
    ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    other = x509.load_pem_x509_certificate(CA(tmp_path / "other", "impostor CA").path.read_bytes())
    with pytest.raises(Exception):
        other.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_key_files_are_readable_by_their_owner_only(tmp_path):
    ca = CA(tmp_path)
    (tmp_path / "gpu-a.key").write_text("left by an earlier run")
    (tmp_path / "gpu-a.key").chmod(0o644)
    for _, key in (ca.issue("collector", server=True), ca.issue("gpu-a")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert b"PRIVATE KEY" in key.read_bytes()


def test_a_tls_client_trusting_the_ca_completes_a_handshake_with_the_server_certificate(tmp_path):
    import socket

    ca = CA(tmp_path)
    crt, key = ca.issue("collector", server=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(crt, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        for host in ("127.0.0.1", "localhost"):
            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            client_ctx = ssl.create_default_context(cafile=str(ca.path))
            with socket.create_connection(("127.0.0.1", port)) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=host) as tls:
                assert tls.getpeercert()["subject"] == ((("commonName", "collector"),),)
            thread.join(5)
