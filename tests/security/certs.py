"""A throw-away certificate authority for the TLS tests: fleetscope.certs's, under the tests' own name."""

from __future__ import annotations

from pathlib import Path

from fleetscope.certs import CA as _CA


class CA(_CA):
    """A CA in `folder`; `issue(name)` writes <name>.crt and <name>.key signed by it."""

    def __init__(self, folder: Path, name: str = "fleetscope test CA") -> None:
        super().__init__(folder, name)
