"""docs/reference is what the code says: regenerated in memory and compared with the committed files, and the
generator's inputs are complete (every variable read has a meaning, every metric family declared is listed)."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

from tools import envscan, gen_reference

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = f"run `{gen_reference.COMMAND}` and commit docs/reference"


def test_the_committed_reference_is_what_the_code_generates():
    pages = gen_reference.render()
    committed = {p.name for p in gen_reference.OUT.glob("*.md")}
    assert committed == set(pages), f"docs/reference holds {sorted(committed)}, the generator writes {sorted(pages)}: {REGENERATE}"
    stale = [name for name, text in pages.items() if (gen_reference.OUT / name).read_text() != text]
    assert not stale, f"docs/reference/{', '.join(stale)} differ from the code: {REGENERATE}"


def test_every_environment_variable_the_code_reads_has_a_meaning_and_none_is_left_over():
    found = gen_reference.scan()  # the generator's own scan (cached)
    assert not found.unresolved, ("reads of a variable whose name the scan cannot tell (use a literal name, or add the "
                                  f"helper to tools/envscan.py READERS): {found.unresolved}")
    missing = sorted(set(found.reads) - set(gen_reference.ENVIRONMENT))
    assert not missing, f"add a one-line meaning to ENVIRONMENT in tools/gen_reference.py for {missing}, then {REGENERATE}"
    gone = sorted(set(gen_reference.ENVIRONMENT) - set(found.reads))
    assert not gone, f"no code reads {gone} any more: remove them from ENVIRONMENT in tools/gen_reference.py"
    # the two the issue named, read in code and now documented
    text = (gen_reference.OUT / "environment.md").read_text()
    assert "`FLEETSCOPE_AGENT_ADDR`" in text and "`FLEETSCOPE_DATA_DIR`" in text


def test_the_scan_finds_every_kind_of_read(tmp_path):
    (tmp_path / "fleetscope").mkdir()
    (tmp_path / "fleetscope" / "m.py").write_text(
        'import os\nNAMES = (("a", "T_LOOP"),)\n'
        'os.environ.get("T_GET"); os.getenv("T_GETENV"); os.environ["T_ITEM"]; "T_IN" in os.environ\n'
        'read_secret("T_SECRET")\nfor _, n in NAMES:\n    os.environ.get(n)\n'
        'def f(x):\n    return os.environ.get(x)\nos.environ["T_SET"] = "1"\n')
    found = envscan.scan(tmp_path)
    assert set(found.reads) == {"T_GET", "T_GETENV", "T_ITEM", "T_IN", "T_SECRET", "T_SECRET_FILE", "T_LOOP"}
    assert found.unresolved == ["fleetscope/m.py:8: os.environ.get(x)"]


def test_every_flag_has_help_text_and_is_in_the_reference():
    from fleetscope.cli import build_parser

    text = (gen_reference.OUT / "cli.md").read_text()
    for words, parser in gen_reference._commands(build_parser(), ("fleetscope",)):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{' '.join(words)} {action.option_strings or action.dest} has no help text"
            for flag in action.option_strings:
                assert f"`{flag}`" in text, flag


def _literal_family_names(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if func in ("Family", "GaugeMetricFamily", "CounterMetricFamily") and isinstance(node.args[0].value, str):
                    name = node.args[0].value
                    names.add(name + "_total" if func == "CounterMetricFamily" else name)
    return names


def test_every_metric_family_declared_in_the_code_is_in_the_reference():
    text = (gen_reference.OUT / "metrics.md").read_text()
    listed = set(re.findall(r"^\| `([A-Za-z_:][A-Za-z0-9_:]*)` \|", text, re.M))
    declared = _literal_family_names("agent") | _literal_family_names("collector")
    assert declared, "the scan found no family: it no longer matches how families are declared"
    assert not declared - listed, f"families the generator misses: {sorted(declared - listed)}"
    assert {"fleetscope_gpu_utilization_ratio", "DCGM_FI_DEV_GPU_UTIL", "fleetscope_training_straggler_score",
            "fleetscope_collector_batches_total", "fleetscope_inference_ttft_p99_seconds"} <= listed


def test_every_api_route_is_in_the_reference():
    from collector.api.app import create_app  # noqa: F401 - the routes are assembled there

    text = (gen_reference.OUT / "api.md").read_text()
    routes = set()
    for path in (ROOT / "collector/api/routes").glob("*.py"):
        routes |= set(re.findall(r'@router\.(get|post|put|delete)\("([^"]+)"', path.read_text()))
    assert routes
    for method, route in routes:
        assert f"## `{method.upper()} {route}`" in text, (method, route)
