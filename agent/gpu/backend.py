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
    from agent.gpu.kmsg import KernelXids
    from agent.gpu.nvml import Nvml, NvmlUnavailable

    try:
        backend = Nvml(kernel_log=KernelXids())
    except ImportError:
        if kind == "nvml":
            raise
        log.warning("no GPUs: pynvml is not installed (pip install 'fleetscope[agent]'); running with host sources only")
        return None
    try:
        backend.init()
    except NvmlUnavailable as exc:
        if kind == "auto" and exc.absent:
            # No NVIDIA library on this node: not an error; the gpu source has no data, and looks again with backoff.
            log.info("no GPUs yet: %s; the gpu source keeps looking", exc)
        else:
            # A driver that has not loaded (yet) is an error the operator sees (source_up 0, source_error 1) until NVML answers.
            log.error("%s; the gpu source reports the error and retries with backoff", exc)
    return backend
