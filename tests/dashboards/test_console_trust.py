"""Names from the API are data, never markup or paths; with sign-in configured, nothing shows (or is
fetched) before the viewer signs in."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from dashboards.auth import md, write_oidc_secrets
from tests.dashboards.test_pages import DASHBOARDS, INGEST, PAGES, READ, collector_url, run_page  # noqa: F401 - fixture

# '?' and '#' would cut the path short and '..' climb it if the name were pasted into the URL unquoted.
# (A '/' in a name is quoted too, but the server decodes it before routing: such a name gets a 404, never
# another endpoint.)
HOSTILE_SERVICE = "[click](javascript:alert) **x** ..?x=1#frag"


def test_md_escapes_links_emphasis_html_and_math():
    out = md("[a](http://e) *b* _c_ <b>d</b> $x$ `e` # f")
    for raw in ("[a](", "*b*", "_c_", "<b>", "$x$", "`e`"):
        assert raw not in out
    assert out.replace("\\", "") == "[a](http://e) *b* _c_ <b>d</b> $x$ `e` # f"


def test_a_hostile_service_name_is_neither_markup_nor_a_path(collector_url, monkeypatch):  # noqa: F811
    now = time.time()
    batch = {"v": 1, "agent_id": "hostile", "seq": 0, "node": "node-h", "sent_ts": now, "frames": [], "events": [
        {"v": 1, "kind": "request", "service": HOSTILE_SERVICE, "model": "m1", "ts": now - 5, "e2e_s": 0.5,
         "ttft_s": 0.1, "tpot_s": 0.01, "output_tokens": 4, "status": "ok"}]}
    resp = httpx.post(collector_url + "/v1/ingest", content=json.dumps(batch), headers={"Authorization": f"Bearer {INGEST}"})
    assert resp.status_code == 200, resp.text
    monkeypatch.setenv("FLEETSCOPE_COLLECTOR_URL", collector_url)
    monkeypatch.setenv("FLEETSCOPE_CONSOLE_REFRESH_S", "0")
    monkeypatch.setenv("FLEETSCOPE_READ_TOKEN", READ)
    at = AppTest.from_file(str(DASHBOARDS / "pages/3_Inference.py"), default_timeout=30)
    at.run()
    at.selectbox(key="service").set_value(HOSTILE_SERVICE).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    headings = [h.value for h in at.subheader]
    assert any(h.startswith(md(HOSTILE_SERVICE)) for h in headings), headings  # escaped, so shown as typed
    # The service's own latency came back: the name reached /v1/services/<name> as one quoted segment.
    assert any(m.label == "e2e p50" and m.value == "500.0 ms" for m in at.metric)


AUTH = {"redirect_uri": "http://127.0.0.1:8501/oauth2callback", "cookie_secret": "x" * 32, "client_id": "c",
        "client_secret": "s", "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}


@pytest.mark.parametrize("page", PAGES)
def test_with_sign_in_configured_a_page_shows_and_fetches_nothing_before_sign_in(page, monkeypatch):
    # The collector URL points nowhere: a page that fetched anything would show "cannot reach the collector".
    monkeypatch.setenv("FLEETSCOPE_COLLECTOR_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("FLEETSCOPE_CONSOLE_REFRESH_S", "0")
    monkeypatch.setenv("FLEETSCOPE_READ_TOKEN", READ)
    monkeypatch.setenv("FLEETSCOPE_CONSOLE_AUTH", "oidc")
    at = AppTest.from_file(str(DASHBOARDS / page), default_timeout=30)
    at.secrets["auth"] = AUTH
    at.run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    assert [b.label for b in at.button] == ["Sign in"]
    assert not at.metric and not at.dataframe


def test_sign_in_on_but_not_configured_fails_closed(monkeypatch):
    monkeypatch.setenv("FLEETSCOPE_CONSOLE_AUTH", "oidc")
    at = run_page("app.py", "http://127.0.0.1:9", READ, monkeypatch)
    assert not at.exception
    assert any("no [auth] settings" in e.value for e in at.error)
    assert not at.metric and not at.button


def test_an_unknown_auth_mode_shows_nothing(monkeypatch):
    monkeypatch.setenv("FLEETSCOPE_CONSOLE_AUTH", "ldap")
    at = run_page("app.py", "http://127.0.0.1:9", READ, monkeypatch)
    assert any("not one of" in e.value for e in at.error)
    assert not at.metric


def test_the_oidc_settings_file_is_private_and_well_formed(tmp_path):
    import stat
    import tomllib

    path = write_oidc_secrets("https://idp.example/", 'console"id', "s3cret", "https://console.example:8501/")
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        auth = tomllib.loads(path.read_text())["auth"]
        assert auth["client_id"] == 'console"id'
        assert auth["redirect_uri"] == "https://console.example:8501/oauth2callback"
        assert auth["server_metadata_url"] == "https://idp.example/.well-known/openid-configuration"
        assert len(auth["cookie_secret"]) >= 32
    finally:
        path.unlink()
        path.parent.rmdir()
