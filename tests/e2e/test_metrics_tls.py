"""A real Prometheus scrapes a real agent over HTTPS with basic auth, both configured as the Prometheus docs say:
the agent with a web config file (--web-config), Prometheus with scheme https, tls_config and basic_auth."""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.conftest import free_port, require_binary, wait_until
from tests.e2e.dashboard_fleet import instant_query
from tests.security.certs import CA

bcrypt = pytest.importorskip("bcrypt")


def test_prometheus_scrapes_the_agent_over_https_with_a_password(procs, tmp_path):
    prometheus = require_binary("prometheus")
    ca = CA(tmp_path / "pki")
    cert, key = ca.issue("agent", server=True)
    password = "scrape-me"
    (tmp_path / "web.yml").write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(cert), "key_file": str(key), "min_version": "TLS12"},
        "basic_auth_users": {"prometheus": bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()},
    }))
    m_port, e_port, p_port = free_port(), free_port(), free_port()
    agent = procs("agent", [sys.executable, "-m", "fleetscope", "agent", "--node", "tls-node", "--gpu-backend", "simulated",
                            "--gpus", "2", "--interval", "1", "--metrics-address", f"127.0.0.1:{m_port}",
                            "--events-address", f"127.0.0.1:{e_port}", "--web-config", str(tmp_path / "web.yml")])
    (tmp_path / "password").write_text(password)
    job = {"scheme": "https", "tls_config": {"ca_file": str(ca.path)},
           "basic_auth": {"username": "prometheus", "password_file": str(tmp_path / "password")},
           "static_configs": [{"targets": [f"127.0.0.1:{m_port}"]}]}
    wrong = {**job, "job_name": "wrong-password", "basic_auth": {"username": "prometheus", "password": "guess"}}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{**job, "job_name": "agent"}, wrong,
                           {"job_name": "plain-http", "static_configs": [{"targets": [f"127.0.0.1:{m_port}"]}]}],
    }))
    procs("prometheus", [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{p_port}"])
    url = f"http://127.0.0.1:{p_port}"

    def up(job_name: str) -> str | None:
        result = instant_query(url, f'up{{job="{job_name}"}}')
        return result[0]["value"][1] if result else None

    wait_until(lambda: up("agent") == "1", what="up == 1 for the agent scraped over HTTPS with a password", timeout=60)
    assert instant_query(url, 'fleetscope_agent_build_info{job="agent"}'), agent.output()  # the agent's own series
    wait_until(lambda: up("wrong-password") == "0" and up("plain-http") == "0",
               what="up == 0 for a wrong password and for plain HTTP", timeout=30)
