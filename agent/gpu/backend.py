"""Which GPU backend the agent reads: NVML, the simulator, or none."""

from __future__ import annotations

import logging

log = logging.getLogger("fleetscope.agent.gpu")


def make_backend(kind: str, *, gpus: int = 8, seed: int = 0, node: str = "sim", scenario: str | None = None):
    """Return a GPU backend for `kind` (auto, nvml, simulated, none), or None for no GPUs."""
    if kind == "none":
        return None
    if kind == "simulated":
        from agent.gpu.scenario import load_scenario
        from agent.gpu.sim import SimulatedGpus

        return SimulatedGpus(gpus, seed=seed, node=node, faults=load_scenario(scenario) if scenario else ())
    from agent.gpu.nvml import Nvml, NvmlUnavailable

    try:
        backend = Nvml()
    except ImportError:
        if kind == "nvml":
            raise
        log.warning("no GPUs: pynvml is not installed (pip install 'fleetscope[agent]'); running with host sources only")
        return None
    try:
        backend.init()
    except NvmlUnavailable as exc:
        if kind == "nvml":
            # Asked for NVML explicitly: keep trying at every sample, with gpu source_up 0 meanwhile.
            log.error("%s; the gpu source will retry at every sample", exc)
            return backend
        log.warning("no GPUs: %s; running with host sources only", exc)
        return None
    return backend
