"""Alert rules are valid, their promtool unit tests pass, and every rule carries what on-call needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_binary

ALERTS = Path(__file__).resolve().parents[2] / "alerts"
RULE_FILES = sorted(ALERTS.glob("*.rules.yml"))


def rules():
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    yield rule


def test_there_are_rule_files():
    assert RULE_FILES


def test_promtool_check_rules():
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests():
    promtool = require_binary("promtool")
    tests = sorted((ALERTS / "tests").glob("*.test.yml"))
    assert tests
    result = subprocess.run([promtool, "test", "rules", *map(str, tests)], capture_output=True, text=True, cwd=ALERTS / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test():
    tested = set()
    for path in (ALERTS / "tests").glob("*.test.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert {r["alert"] for r in rules()} <= tested


@pytest.mark.parametrize("rule", list(rules()), ids=lambda r: r["alert"])
def test_every_alert_says_for_how_long_how_bad_what_and_where_to_read_more(rule):
    assert rule.get("for"), "a rule without `for` pages on one bad scrape"
    assert rule["labels"]["severity"] in ("page", "ticket")
    annotations = rule["annotations"]
    assert annotations["summary"] and annotations["description"]
    runbook = annotations["runbook_url"]
    assert runbook == f"alerts/runbooks/{rule['alert']}.md"
    assert (ALERTS.parent / runbook).is_file()


def test_committed_rules_and_runbooks_are_what_the_thresholds_generate():
    from alerts.generate import main

    assert main(["--check"]) == 0, "run `python -m alerts.generate` and commit the result"


def test_a_threshold_change_reaches_the_rule_and_its_runbook():
    from alerts.definitions import ALERTS
    from alerts.generate import rule, runbook, thresholds

    values = thresholds()
    values["gpu"]["temperature_margin_celsius"] = 9
    alert = next(a for a in ALERTS if a.name == "FleetscopeGpuTemperatureNearSlowdown")
    assert "fleetscope_gpu_temperature_slowdown_celsius - 9" in rule(alert, values)["expr"]
    assert "within 9 °C" in rule(alert, values)["annotations"]["description"]
    assert "- 9" in runbook(alert, values)


def test_every_runbook_says_what_it_means_how_to_confirm_and_what_to_do():
    for rule in rules():
        text = (ALERTS.parent / rule["annotations"]["runbook_url"]).read_text()
        for section in ("**Meaning.**", "**Confirm.**", "**Act.**"):
            assert section in text, (rule["alert"], section)


def test_amtool_accepts_the_alertmanager_config_and_the_rendered_one(tmp_path):
    from alerts.render_alertmanager import render

    amtool = require_binary("amtool")
    for path in (ALERTS / "alertmanager.yml",):
        result = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    rendered = tmp_path / "alertmanager.yml"
    rendered.write_text(render({"FLEETSCOPE_PAGE_WEBHOOK_URL": "https://pager.example/hook",
                                "FLEETSCOPE_TICKET_WEBHOOK_URL": "https://chat.example/hook"}))
    assert "webhook-placeholder" not in rendered.read_text() and "https://pager.example/hook" in rendered.read_text()
    result = subprocess.run([amtool, "check-config", str(rendered)], capture_output=True, text=True)
    assert result.returncode == 0 and "5 inhibit rules" in result.stdout, result.stdout + result.stderr


def test_rendering_without_the_receivers_urls_says_which_are_missing():
    from alerts.render_alertmanager import render

    with pytest.raises(SystemExit, match="FLEETSCOPE_TICKET_WEBHOOK_URL"):
        render({"FLEETSCOPE_PAGE_WEBHOOK_URL": "https://pager.example/hook"})


def test_pages_and_tickets_go_to_their_receivers_and_inhibitions_hold(tmp_path):
    amtool = require_binary("amtool")

    def route(labels: str) -> str:
        result = subprocess.run([amtool, "config", "routes", "test", f"--config.file={ALERTS / 'alertmanager.yml'}",
                                 *labels.split()], capture_output=True, text=True)
        return result.stdout.strip()

    assert route("alertname=FleetscopeGpuLost severity=page") == "page"
    assert route("alertname=FleetscopeGpuXid severity=ticket") == "ticket"
    config = yaml.safe_load((ALERTS / "alertmanager.yml").read_text())
    sources = {r["source_matchers"][0] for r in config["inhibit_rules"]}
    assert 'alertname="FleetscopeAgentDown"' in sources and 'alertname="FleetscopeGpuLost"' in sources
    assert 'alertname="FleetscopeTrainingHang"' in sources
