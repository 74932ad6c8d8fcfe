"""The console behind OpenID Connect, against a real provider (oidc-provider-mock), a real collector,
the real `fleetscope dashboard` and a real Chromium: nothing before sign-in, the fleet after it."""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from tests.conftest import free_port, http_get, wait_until
from tests.dashboards.test_pages import seed_batch
from tests.e2e.conftest import INGEST, READ, collector, collector_flags, procs  # noqa: F401 - fixtures
from tests.e2e.test_browser import browser  # noqa: F401 - fixture


def test_the_console_shows_the_fleet_only_to_a_signed_in_user(procs, collector, browser):  # noqa: F811
    pytest.importorskip("authlib")
    provider = pytest.importorskip("oidc_provider_mock")
    from selenium.webdriver.common.by import By

    resp = httpx.post(collector.url + "/v1/ingest", content=json.dumps(seed_batch()), headers={"Authorization": f"Bearer {INGEST}"})
    assert resp.status_code == 200, resp.text
    with provider.run_server_in_thread() as idp:
        issuer = f"http://127.0.0.1:{idp.server_port}"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        procs("console", [sys.executable, "-m", "fleetscope", "dashboard", "--address", "127.0.0.1", "--port", str(port),
                          "--collector-url", collector.url, "--auth", "oidc", "--oidc-issuer", issuer,
                          "--oidc-client-id", "fleetscope-console", "--public-url", base],
              {"FLEETSCOPE_READ_TOKEN": READ, "FLEETSCOPE_OIDC_CLIENT_SECRET": "console-secret"})
        wait_until(lambda: http_get(base + "/_stcore/health")[0] == 200, timeout=60, what="the console")

        browser.get(base + "/Fleet")
        wait_until(lambda: [b for b in browser.find_elements(By.CSS_SELECTOR, "button") if b.text == "Sign in"],
                   timeout=30, what="the sign-in button")
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')
        assert "node-a" not in browser.page_source  # the fleet is not on the page before sign-in

        next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if b.text == "Sign in").click()
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, 'input[name="sub"]'), timeout=30,
                   what="the provider's sign-in form")
        field = browser.find_element(By.CSS_SELECTOR, 'input[name="sub"]')
        field.send_keys("alice@example.com")
        field.submit()

        wait_until(lambda: browser.current_url.startswith(base), timeout=30, what="the way back to the console")
        browser.get(base + "/Fleet")
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]'), timeout=30,
                   what="the fleet after sign-in")
        wait_until(lambda: "alice@example.com" in browser.page_source, timeout=10, what="who is signed in")
