"""Prometheus' web configuration file (exporter-toolkit's --web.config.file): TLS and basic auth for /metrics.

The format is the one every Prometheus exporter shares (https://github.com/prometheus/exporter-toolkit/blob/master/
docs/web-configuration.md), so one file and one Prometheus scrape config serve node_exporter and fleetscope alike:

    tls_server_config:
      cert_file: agent.crt              # relative paths are taken from the file's own folder
      key_file: agent.key
      client_ca_file: prometheus-ca.crt # optional; with client_auth_type RequireAndVerifyClientCert
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...            # bcrypt: htpasswd -nBC 10 "" | tr -d ':\\n'

Differences from exporter-toolkit: the file is read once at start, not at every request (restart to pick up new
certificates); Go-only settings (cipher_suites, curve_preferences, ...), inline PEM (cert, key, client_ca),
client_allowed_sans, http_server_config and rate_limit are refused by name rather than silently ignored; and
RequestClientCert / RequireAnyClientCert (a certificate asked for but not verified) have no equal in Python's ssl.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

TOP_KEYS = {"tls_server_config", "basic_auth_users"}
TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"}
# In the format, but not implemented here: refused with a reason, so a file written for a Go exporter never
# silently loses a protection it asked for.
_UNSUPPORTED = {
    "http_server_config": "HTTP/2 and extra response headers are not implemented",
    "rate_limit": "rate limiting is not implemented",
    "cert": "inline PEM is not implemented; use cert_file",
    "key": "inline PEM is not implemented; use key_file",
    "client_ca": "inline PEM is not implemented; use client_ca_file",
    "client_allowed_sans": "matching client certificate SANs is not implemented",
    "cipher_suites": "Go cipher suite names do not apply; Python's ssl defaults are used",
    "prefer_server_cipher_suites": "Go cipher suite settings do not apply",
    "curve_preferences": "Go curve names do not apply",
}
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# exporter-toolkit's client_auth_type -> Python's verify_mode; the two that ask for a certificate without
# verifying it have no equal in Python's ssl.
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_BCRYPT = re.compile(r"\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}")
# Compared against when the user is unknown, so an unknown name takes as long to refuse as a wrong password.
_DUMMY_HASH = b"$2b$10$qzGeIpTwpSvvlzcs0sxpSu6mIG5k6F/xsQuW2c8J6mNGKYa9RvCyW"


class WebConfigError(ValueError):
    """A web configuration file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = "TLS13"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _TLS_VERSIONS[self.min_version]
        context.maximum_version = _TLS_VERSIONS[self.max_version]
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"web config: cannot load cert_file {self.cert_file} with key_file {self.key_file}: "
                                 f"{exc}") from None
        context.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise WebConfigError(f"web config: cannot load client_ca_file {self.client_ca_file}: {exc}") from None
        return context


class BasicAuth:
    """Checks `Authorization: Basic` headers against bcrypt hashes; a password once verified is remembered (as a
    salted digest) so that a scrape every few seconds does not pay bcrypt's ~70 ms each time, as exporter-toolkit does."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = {name: hashed.encode() for name, hashed in users.items()}
        self._verified: set[bytes] = set()
        self._salt = hashlib.sha256(repr(sorted(users.items())).encode()).digest()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        """Whether `header` (the Authorization header's value) names a user with the right password."""
        if not header:
            return False
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        hashed = self.users.get(user)
        key = hmac.new(self._salt, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            if hashed is not None and key in self._verified:
                return True
        bcrypt = _bcrypt()
        try:
            ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else _DUMMY_HASH) and hashed is not None
        except ValueError:  # a password bcrypt cannot take (over 72 bytes with bcrypt 5)
            return False
        if ok:
            with self._lock:
                if len(self._verified) > 1000:
                    self._verified.clear()
                self._verified.add(key)
        return ok


@dataclass(frozen=True)
class WebConfig:
    path: Path
    tls: TLSServerConfig | None = None
    basic_auth_users: dict[str, str] = field(default_factory=dict)

    def basic_auth(self) -> BasicAuth | None:
        return BasicAuth(self.basic_auth_users) if self.basic_auth_users else None

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.ssl_context() if self.tls is not None else None


def _bcrypt():
    try:
        import bcrypt
    except ImportError:
        raise WebConfigError("web config: basic_auth_users needs the bcrypt package; pip install 'fleetscope[agent]' "
                             "(or pip install bcrypt)") from None
    return bcrypt


def _refuse_unknown(where: str, table: dict, known: set[str]) -> None:
    for key in table:
        if key in _UNSUPPORTED:
            raise WebConfigError(f"{where}: {key} is not supported by fleetscope ({_UNSUPPORTED[key]}); remove it")
        if key not in known:
            raise WebConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")


def parse_web_config(text: str, path: str | Path) -> WebConfig:
    """A WebConfig from the file's text; `path` names it in errors and anchors its relative file names."""
    try:
        import yaml
    except ImportError:
        raise WebConfigError("web config: reading it needs the pyyaml package; pip install pyyaml") from None
    path = Path(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WebConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: must be a YAML mapping with tls_server_config and/or basic_auth_users")
    _refuse_unknown(str(path), data, TOP_KEYS)
    return WebConfig(path, _tls(data.get("tls_server_config"), path), _users(data.get("basic_auth_users"), path))


def load_web_config(path: str | Path) -> WebConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise WebConfigError(f"web config {path}: cannot read it ({exc.strerror or exc})") from None
    config = parse_web_config(text, path)
    if config.basic_auth_users:
        _bcrypt()  # fail at start, not at the first scrape
    if config.tls is not None:
        config.tls.ssl_context()  # the same: a bad certificate or key is found now
    return config


def _tls(table: object, path: Path) -> TLSServerConfig | None:
    if table is None:
        return None
    where = f"{path}: tls_server_config"
    if not isinstance(table, dict):
        raise WebConfigError(f"{where} must be a mapping")
    _refuse_unknown(where, table, TLS_KEYS)
    for key in ("cert_file", "key_file"):
        if not table.get(key):
            raise WebConfigError(f"{where}: {key} is required")

    def file(key: str) -> Path | None:
        if table.get(key) in (None, ""):
            return None
        name = Path(str(table[key]))
        resolved = name if name.is_absolute() else path.parent / name  # as exporter-toolkit does
        if not resolved.is_file():
            raise WebConfigError(f"{where}: {key} {resolved} is not a readable file")
        return resolved

    auth = str(table.get("client_auth_type") or "NoClientCert")
    if auth == "RequireClientCert":
        auth = "RequireAnyClientCert"  # exporter-toolkit's old name
    if auth in ("RequestClientCert", "RequireAnyClientCert"):
        raise WebConfigError(f"{where}: client_auth_type {auth} (a certificate that is not verified) is not supported; "
                             "use RequireAndVerifyClientCert or VerifyClientCertIfGiven with client_ca_file")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{where}: client_auth_type {auth!r} is not one of {', '.join(_CLIENT_AUTH)}")
    client_ca = file("client_ca_file")
    if client_ca is not None and auth == "NoClientCert":
        raise WebConfigError(f"{where}: client_ca_file is set but client_auth_type is NoClientCert; set client_auth_type "
                             "to RequireAndVerifyClientCert (exporter-toolkit refuses this too)")
    if client_ca is None and auth != "NoClientCert":
        raise WebConfigError(f"{where}: client_auth_type {auth} needs client_ca_file (the CA that signs client certificates)")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = str(table.get(key) or default)
        if value not in _TLS_VERSIONS:
            raise WebConfigError(f"{where}: {key} {value!r} is not one of {', '.join(_TLS_VERSIONS)}")
        versions[key] = value
    if _TLS_VERSIONS[versions["min_version"]] > _TLS_VERSIONS[versions["max_version"]]:
        raise WebConfigError(f"{where}: min_version {versions['min_version']} is above max_version {versions['max_version']}")
    return TLSServerConfig(file("cert_file"), file("key_file"), client_ca, auth, **versions)  # type: ignore[arg-type]


def _users(table: object, path: Path) -> dict[str, str]:
    if table is None:
        return {}
    where = f"{path}: basic_auth_users"
    if not isinstance(table, dict):
        raise WebConfigError(f"{where} must be a mapping of user name to bcrypt hash")
    users: dict[str, str] = {}
    for user, hashed in table.items():
        user = str(user)
        if ":" in user:
            raise WebConfigError(f"{where}: user name {user!r} must not hold ':' (Basic auth cannot send it)")
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            raise WebConfigError(f"{where}: the password of {user!r} is not a bcrypt hash ($2y$10$ and 53 more "
                                 "characters); make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'")
        users[user] = hashed
    return users
