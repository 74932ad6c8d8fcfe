"""What an install carries beside its code: the CLI hands out the rules, runbooks, dashboards and unit, from a checkout and from the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleetscope import assets
from fleetscope.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "alerts" / "fleetscope.rules.yml"
UNIT = REPO / "agent" / "systemd" / "fleetscope-agent.service"
EXAMPLE = REPO / "agent" / "systemd" / "agent.toml.example"
DASHBOARDS = sorted((REPO / "dashboards" / "grafana").glob("*.json"))


def alert_names(rules_text: str) -> set[str]:
    return {r["alert"] for g in yaml.safe_load(rules_text)["groups"] for r in g["rules"] if "alert" in r}


def test_the_rules_come_out_whole_with_a_runbook_for_every_alert(tmp_path, capsys):
    assert cli(["rules"]) == 0
    assert capsys.readouterr().out == RULES.read_text()
    assert cli(["rules", "--output", str(tmp_path / "prom")]) == 0
    assert (tmp_path / "prom" / "fleetscope.rules.yml").read_text() == RULES.read_text()
    assert (tmp_path / "prom" / "alertmanager.yml").read_text() == (REPO / "alerts" / "alertmanager.yml").read_text()
    books = {p.stem for p in (tmp_path / "prom" / "runbooks").glob("*.md")}
    assert books == alert_names(RULES.read_text()) and len(books) > 30


def test_dashboards_unit_and_example_config_come_out_as_shipped(tmp_path, capsys):
    assert cli(["dashboards", "export", str(tmp_path / "grafana")]) == 0
    assert [p.name for p in sorted((tmp_path / "grafana").iterdir())] == [p.name for p in DASHBOARDS] and DASHBOARDS
    assert all((tmp_path / "grafana" / p.name).read_bytes() == p.read_bytes() for p in DASHBOARDS)
    capsys.readouterr()
    assert cli(["agent", "print-unit"]) == 0
    assert capsys.readouterr().out == UNIT.read_text()
    assert cli(["agent", "print-unit", "--bin", "/srv/venv/bin/fleetscope"]) == 0
    unit = capsys.readouterr().out
    assert "ExecStart=/srv/venv/bin/fleetscope agent --config /etc/fleetscope/agent.toml\n" in unit
    assert unit.replace("/srv/venv/bin/fleetscope", assets.UNIT_EXEC) == UNIT.read_text()
    assert cli(["agent", "print-config"]) == 0
    assert capsys.readouterr().out == EXAMPLE.read_text()


def test_a_missing_file_is_named_instead_of_running_without_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "_folder", lambda package, *parts: tmp_path.joinpath(package, *parts))
    with pytest.raises(assets.AssetMissing, match=r"no Prometheus alert rules \(alerts/\*\.rules\.yml\)"):
        assets.rule_files()  # what the demo calls: never an empty list of rules
    assert cli(["rules"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetscope rules: no Prometheus alert rules") and "incomplete" in err


def test_an_agent_config_that_names_no_collector_is_refused(tmp_path, capsys):
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\ninterval_s = 2.0\n")
    assert cli(["agent", "--config", str(config), "--gpu-backend", "none"]) == 2
    err = capsys.readouterr().err
    assert f"fleetscope agent: {config} sets no collector_url" in err and 'collector_url = ""' in err


@pytest.mark.slow  # builds a wheel and a virtual environment
def test_the_wheel_carries_them_and_its_cli_hands_them_out_outside_the_checkout(tmp_path):
    """The user's view: a wheel built from the project, installed into a fresh environment, run elsewhere."""
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, str(REPO / "deploy" / "debian" / "build.py"), "--wheel-only", "--out", str(dist)],
                   check=True, capture_output=True)
    [wheel] = dist.glob("fleetscope-*-py3-none-any.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # --no-deps: these subcommands need nothing beyond the base install (which has no dependencies)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
                    "--no-index", "--no-compile", "--disable-pip-version-check", str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def fleetscope(*argv: str) -> str:
        done = subprocess.run([str(venv / "bin" / "fleetscope"), *argv], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import alerts, fleetscope; print(alerts.__file__, fleetscope.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where  # the wheel's, not the checkout's
    assert fleetscope("rules") == RULES.read_text()
    fleetscope("rules", "--output", "prom")
    assert (work / "prom" / "fleetscope.rules.yml").read_text() == RULES.read_text()
    assert {p.stem for p in (work / "prom" / "runbooks").glob("*.md")} == alert_names(RULES.read_text())
    fleetscope("dashboards", "export", "grafana")
    assert {p.name: p.read_bytes() for p in (work / "grafana").iterdir()} == {p.name: p.read_bytes() for p in DASHBOARDS}
    assert fleetscope("agent", "print-unit", "--bin", assets.UNIT_EXEC) == UNIT.read_text()
    assert fleetscope("agent", "print-config") == EXAMPLE.read_text()
