"""Tokens from systemd credentials, *_FILE files or the environment, never the command line; config files that hold one stay private.

A token on a command line is in `ps` output and /proc/<pid>/cmdline for every user of the machine. Each
token therefore has three ways in, looked up in this order:

1. `$CREDENTIALS_DIRECTORY/<credential>`: systemd's `LoadCredential=<credential>:/etc/fleetscope/<credential>`
   copies the file where only the service can read it;
2. the file `$<NAME>_FILE` names (containers: compose and Kubernetes secrets are files);
3. `$<NAME>` itself.

Setting both `<NAME>` and `<NAME>_FILE` is an error rather than a guess about which one was meant.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Mapping

# Environment variable -> systemd credential name.
CREDENTIALS = {
    "FLEETSCOPE_INGEST_TOKEN": "ingest-token",
    "FLEETSCOPE_READ_TOKEN": "read-token",
    "GRAFANA_TOKEN": "grafana-token",
}

# A config-file key holding one of these words holds a secret.
_SECRET_KEY = re.compile(r"token|password|secret", re.IGNORECASE)


class SecretError(ValueError):
    """A token that is set in a way that cannot be used (unreadable or empty file, two sources at once)."""


def read_secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret `name` (an environment variable's name, e.g. FLEETSCOPE_INGEST_TOKEN), or None when it is
    not set anywhere. Surrounding white space (the newline `echo` leaves) is not part of it."""
    env = os.environ if environ is None else environ
    credential = CREDENTIALS.get(name)
    directory = env.get("CREDENTIALS_DIRECTORY")
    if credential and directory:
        path = Path(directory) / credential
        if path.exists():
            return _read_file(path, f"systemd credential {credential!r}")
    file_var = f"{name}_FILE"
    if env.get(file_var) and env.get(name):
        raise SecretError(f"both {name} and {file_var} are set; keep only {file_var} (a file only this service can read)")
    if env.get(file_var):
        return _read_file(Path(env[file_var]), f"{file_var}={env[file_var]}")
    value = env.get(name, "").strip()
    return value or None


def read_secrets(name: str, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Several tokens (the collector accepts more than one at a time, for rotation): separated by commas,
    white space or new lines, from the same places as read_secret."""
    value = read_secret(name, environ)
    return frozenset(t for t in re.split(r"[\s,]+", value) if t) if value else frozenset()


def _read_file(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise SecretError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SecretError(f"{what}: {path} is not text") from None
    if not value:
        raise SecretError(f"{what}: {path} is empty")
    return value


def load_private_toml(path: str | Path, table: str) -> dict:
    """The TOML file at `path`, refused when its [`table`] holds a token, password or secret while other
    users may read the file (mode & 0o077): the error names the file, its mode and the fix."""
    with open(path, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode  # the file that is read, not one swapped in after a check
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from None
    section = data.get(table, {})
    secret_keys = sorted(k for k in section if _SECRET_KEY.search(k)) if isinstance(section, dict) else []
    if secret_keys and stat.S_IMODE(mode) & 0o077:
        raise SecretError(
            f"{path}: holds {', '.join(secret_keys)} but its mode is {stat.S_IMODE(mode):04o}, so other users of this "
            f"machine can read it; run `chmod 600 {path}` (owned by the user the service runs as), or better, take the "
            f"token out of the file and use a credential file (systemd LoadCredential=, or *_FILE; see README, Security)")
    return data


def refused_flag_message(command: str, flag: str, env: str) -> str:
    """What `fleetscope <command>` says to a token given on its command line."""
    credential = CREDENTIALS.get(env)
    under_systemd = f" or, under systemd, LoadCredential={credential}:/etc/fleetscope/{credential}," if credential else ""
    return (
        f"fleetscope {command}: {flag} is no longer accepted: a token on the command line is visible to every user "
        f"of this machine (ps, /proc/<pid>/cmdline). Put the token in a file other users cannot read (chmod 600) and set "
        f"{env}_FILE=/path/to/that/file{under_systemd} or set {env} in the environment. The token you gave has "
        f"been on a command line: treat it as exposed and replace it.\n")
