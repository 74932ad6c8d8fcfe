"""The files fleetscope ships beside its code (alert rules, runbooks, Grafana dashboards, the agent's unit), found in a checkout or an install.

They live in the packages that own them (`alerts/`, `dashboards/grafana/`, `agent/systemd/`) and travel
as package data (pyproject.toml), so `importlib.resources` finds them wherever the packages were imported
from: a wheel in site-packages, a .deb's virtual environment, or a checkout. A checkout whose editable
install predates a package (`alerts` became one late) is found beside `fleetscope/`.
Standard library only: the base install (no extras) hands these files out too.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

UNIT_NAME = "fleetscope-agent.service"
UNIT_EXEC = "/opt/fleetscope/bin/fleetscope"  # where the .deb (and the README's pip steps) put the command


class AssetMissing(FileNotFoundError):
    """A file that should have come with fleetscope is not where it belongs: the install is incomplete."""


def _folder(package: str, *parts: str) -> Path:
    """The folder `parts` under `package`, wherever that package was imported from."""
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        root = None
    # Installed and checked-out packages are plain folders; a zipped install would need as_file() copies,
    # and nothing installs fleetscope that way.
    if not isinstance(root, Path):
        root = Path(__file__).resolve().parent.parent / package
    return root.joinpath(*parts)


def _files(package: str, subfolder: str, pattern: str, what: str) -> list[Path]:
    folder = _folder(package, *filter(None, [subfolder]))
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not found:
        where = f"{package}/{subfolder + '/' if subfolder else ''}{pattern}"
        raise AssetMissing(f"no {what} ({where}) in {folder}: this fleetscope install is incomplete; reinstall it "
                           "from its wheel or .deb (they carry them), or run from a checkout")
    return found


def _file(package: str, subfolder: str, name: str, what: str) -> Path:
    return _files(package, subfolder, name, what)[0]


def rule_files() -> list[Path]:
    """The Prometheus rule files (alerts/*.rules.yml); AssetMissing when there are none, so that nothing
    runs Prometheus with no rules (no alert could fire) without saying so."""
    return _files("alerts", "", "*.rules.yml", "Prometheus alert rules")


def runbooks() -> list[Path]:
    """One Markdown runbook per alert (alerts/runbooks/<alertname>.md)."""
    return _files("alerts", "runbooks", "*.md", "alert runbooks")


def alertmanager_template() -> Path:
    """Alertmanager's routing and inhibitions, receivers as placeholders (python -m alerts.render_alertmanager fills them)."""
    return _file("alerts", "", "alertmanager.yml", "Alertmanager configuration")


def grafana_dashboards() -> list[Path]:
    """The Grafana dashboards as JSON (built by python -m dashboards.grafana.build)."""
    return _files("dashboards", "grafana", "*.json", "Grafana dashboards")


def agent_unit() -> Path:
    """The agent's systemd unit."""
    return _file("agent", "systemd", UNIT_NAME, "systemd unit")


def agent_config_example() -> Path:
    """An example /etc/fleetscope/agent.toml."""
    return _file("agent", "systemd", "agent.toml.example", "example agent.toml")


def agent_unit_text(executable: str | None = None) -> str:
    """The unit, with ExecStart running `executable` (a fleetscope command) instead of UNIT_EXEC when given."""
    text = agent_unit().read_text()
    if executable and executable != UNIT_EXEC:
        if f"ExecStart={UNIT_EXEC} " not in text:
            raise AssetMissing(f"{agent_unit()}: its ExecStart does not run {UNIT_EXEC}; cannot point it elsewhere")
        text = text.replace(f"ExecStart={UNIT_EXEC} ", f"ExecStart={executable} ", 1)
    return text


def export_rules(folder: Path) -> list[Path]:
    """Write the rule files, runbooks/ and alertmanager.yml (the template) into `folder`; the paths written."""
    sources = [*rule_files(), alertmanager_template()]
    books = runbooks()
    (folder / "runbooks").mkdir(parents=True, exist_ok=True)
    written = [Path(shutil.copyfile(src, folder / src.name)) for src in sources]
    written += [Path(shutil.copyfile(src, folder / "runbooks" / src.name)) for src in books]
    return written


def export_dashboards(folder: Path) -> list[Path]:
    """Write the Grafana dashboards' JSON into `folder`; the paths written."""
    dashboards = grafana_dashboards()
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(src, folder / src.name)) for src in dashboards]
