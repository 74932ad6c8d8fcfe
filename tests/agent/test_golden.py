"""Golden exposition: the GPU source's whole output for a fixed simulated node, byte for byte.

A change to any GPU metric name, label, unit or help text shows up here as a diff to review.
Regenerate after an intended change with: FLEETSCOPE_UPDATE_GOLDEN=1 pytest tests/agent/test_golden.py
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agent.exposition import render
from agent.gpu.scenario import parse_scenario
from agent.gpu.sim import SimulatedGpus
from agent.sources.gpu import GpuSource
from tests.conftest import require_binary

GOLDEN = Path(__file__).parent / "golden" / "gpu.prom"
FAULTS = parse_scenario({"fault": [
    {"at_s": 10, "gpu": 0, "kind": "xid", "xid": 48},
    {"at_s": 10, "gpu": 1, "kind": "pcie_degraded", "width": 8},
    {"at_s": 25, "gpu": 1, "kind": "xid", "xid": 79},
]})


def exposition() -> bytes:
    t = [0.0]
    clock = lambda: t[0]  # noqa: E731
    source = GpuSource(backend=SimulatedGpus(2, seed=42, node="golden", clock=clock, faults=FAULTS),
                       expected_gpus=2, clock=clock, compat_dcgm=True, hostname="golden")
    for _ in range(3):  # 0 s, 20 s: GPU 0 has its XID 48, GPU 1 a narrow link; 40 s: GPU 1 is lost
        t[0] += 20
        source.collect()
    return render(source.families, source.collect())  # what /metrics serves


def test_gpu_exposition_matches_the_golden_file():
    text = exposition()
    if os.environ.get("FLEETSCOPE_UPDATE_GOLDEN"):
        GOLDEN.write_bytes(text)
    assert text == GOLDEN.read_bytes(), "GPU exposition changed; review the diff and regenerate (see module docstring)"


def test_golden_file_is_what_promtool_accepts():
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=GOLDEN.read_text(), capture_output=True, text=True)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert all(line.startswith("DCGM_FI_") for line in findings), findings  # see test_exporter for the DCGM exceptions
