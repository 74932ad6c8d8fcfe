"""Who may see the console.

`FLEETSCOPE_CONSOLE_AUTH=oidc` (set by `fleetscope dashboard --auth oidc`): OpenID Connect through
Streamlit's own `st.login`; every page shows nothing but a sign-in button until the user has signed
in with the configured provider, so the read token the console holds serves only signed-in users.
Unset or `none`: no sign-in, which `fleetscope dashboard` allows on a loopback address only (or with
`--insecure`).
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

import streamlit as st

MODES = ("none", "oidc")


def gate() -> None:
    """Stop the page unless the viewer may see it."""
    mode = os.environ.get("FLEETSCOPE_CONSOLE_AUTH", "none")
    if mode == "none":
        return
    if mode != "oidc":
        st.error(f"FLEETSCOPE_CONSOLE_AUTH={mode!r} is not one of {', '.join(MODES)}: the console shows nothing.")
        st.stop()
    try:
        configured = "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file at all
        configured = False
    if not configured:
        st.error("Sign-in is on (FLEETSCOPE_CONSOLE_AUTH=oidc) but Streamlit has no [auth] settings: the console shows "
                 "nothing. Start it with `fleetscope dashboard --auth oidc ...`.")
        st.stop()
    if not _logged_in():
        st.write("Sign in to see the fleet.")
        st.button("Sign in", on_click=st.login, type="primary")
        st.stop()
    with st.sidebar:
        st.caption(f"Signed in as {md(str(st.user.get('email') or st.user.get('name') or st.user.get('sub') or '?'))}")
        st.button("Sign out", on_click=st.logout)


def _logged_in() -> bool:
    try:
        return bool(st.user.is_logged_in)
    except (AttributeError, KeyError, Exception):  # noqa: BLE001 - st.user without an identity provider
        return False


def write_oidc_secrets(issuer: str, client_id: str, client_secret: str, public_url: str,
                       cookie_secret: str | None = None) -> Path:
    """Streamlit's [auth] settings in a file only this user can read (st.login reads them from there).

    `issuer` is the provider's base URL (its /.well-known/openid-configuration is read); `public_url`
    is where users reach the console, so the provider sends them back to `<public_url>/oauth2callback`.
    The cookie secret, unless given, is new at each start: sessions end when the console restarts."""
    def q(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    metadata = issuer.rstrip("/") + "/.well-known/openid-configuration"
    text = (
        "[auth]\n"
        f"redirect_uri = {q(public_url.rstrip('/') + '/oauth2callback')}\n"
        f"cookie_secret = {q(cookie_secret or secrets.token_urlsafe(32))}\n"
        f"client_id = {q(client_id)}\n"
        f"client_secret = {q(client_secret)}\n"
        f"server_metadata_url = {q(metadata)}\n"
    )
    folder = Path(tempfile.mkdtemp(prefix="fleetscope-console-"))  # 0700
    path = folder / "secrets.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


_MD_SPECIAL = set("\\`*_{}[]()#+-.!|<>~$:")


def md(text: str) -> str:
    """`text` (a job, node or service name from the API) safe to put in markdown: no links, no emphasis,
    no HTML, no math."""
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in str(text))
