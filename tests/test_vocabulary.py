"""The shared vocabulary is the one place its values live: every health reason the agent can give is
in it, and no copy of a shared threshold sits in alerts/thresholds.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from agent.gpu import health
from fleetscope import vocabulary

ROOT = Path(__file__).resolve().parents[1]


def test_every_reason_the_verdict_can_give_is_in_the_vocabulary():
    source = Path(health.__file__).read_text()
    given = set(re.findall(r'(?:bad|weak)\.append\("([a-z_0-9]+)"\)', source))
    assert given, "the verdict's reasons were not found: has agent/gpu/health.py changed shape?"
    assert given <= set(vocabulary.HEALTH_REASONS), given - set(vocabulary.HEALTH_REASONS)
    from agent.gpu.nvml import _GPU_FATAL, reason_of  # the reasons an unreadable GPU is reported with

    import pynvml
    for name in _GPU_FATAL:
        assert reason_of(getattr(pynvml, f"NVMLError_{name}")()) in vocabulary.HEALTH_REASONS


def test_a_gpu_unreadable_for_any_nvml_error_gets_a_reason_of_the_vocabulary():
    """A GPU none of whose vital fields answered is reported with its commonest error: whatever that error is
    (every NVMLError class of the real pynvml, and a code it has no class for), the reason is one the alerts,
    runbooks and console know. IRQ issue and insufficient power are named; an odd one is "nvml_error"."""
    import pynvml

    from agent.gpu.nvml import reason_of, unreadable_reason

    classes = [c for name, c in vars(pynvml).items() if name.startswith("NVMLError_") and isinstance(c, type)]
    assert len(classes) > 20, "pynvml's error classes were not found"
    generic = pynvml.NVMLError(77)  # a code pynvml has no class for (999 is its Unknown)
    given = {unreadable_reason(reason_of(c())) for c in classes} | {unreadable_reason(reason_of(generic))}
    assert given <= set(vocabulary.HEALTH_REASONS), given - set(vocabulary.HEALTH_REASONS)
    assert unreadable_reason(reason_of(pynvml.NVMLError_IrqIssue())) == "irq_issue"
    assert unreadable_reason(reason_of(generic)) == "nvml_error"


def test_shared_thresholds_are_not_copied_into_the_alert_thresholds():
    values = tomllib.loads((ROOT / "alerts" / "thresholds.toml").read_text())
    assert "memory_stalled_share" not in values["host"]
    assert "temperature_margin_celsius" not in values["gpu"]
    from alerts.generate import thresholds

    merged = thresholds()
    assert merged["host"]["memory_stalled_share"] == vocabulary.MEMORY_STALLED_SHARE
    assert merged["gpu"]["temperature_margin_celsius"] == vocabulary.TEMPERATURE_MARGIN_C


def test_clock_event_bit_groups_are_made_of_named_bits():
    names = {bit: name for bit, name in vocabulary.CLOCK_EVENT_REASONS.items()}
    assert {names[b] for b in names if b & vocabulary.THERMAL_BITS} == {"sw_thermal_slowdown", "hw_thermal_slowdown"}
    assert names[vocabulary.POWER_CAP_BIT] == "sw_power_cap"
    assert vocabulary.TROUBLE_EVENTS <= set(names.values())


def test_no_code_writes_a_default_port_as_a_number_of_its_own():
    """The ports are fleetscope.vocabulary's: a number written again elsewhere drifts from it one day."""
    import ast
    from pathlib import Path

    from fleetscope import vocabulary

    ports = {vocabulary.AGENT_METRICS_PORT, vocabulary.AGENT_EVENTS_PORT, vocabulary.COLLECTOR_PORT, vocabulary.CONSOLE_PORT}
    root = Path(__file__).resolve().parents[1]
    found = [f"{path.relative_to(root)}:{node.lineno}"
             for package in ("agent", "collector", "dashboards", "fleetscope", "alerts", "client")
             for path in (root / package).rglob("*.py") if path.name != "vocabulary.py"
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and type(node.value) is int and node.value in ports]
    assert not found, f"a default port written as a number: {found}"
