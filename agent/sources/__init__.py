"""Sources: one module per subsystem, each registering itself by name."""

from __future__ import annotations

import logging

from agent.gpu.backend import make_backend
from agent.kubernetes import make_client as make_pod_resources_client
from agent.sources import (  # noqa: F401 - registration
    cpu,
    gpu,
    hwmon,
    inference,
    infiniband,
    memory,
    network,
    pressure,
    slurm,
    storage,
)
from agent.sources.base import REGISTRY, NoData, Reading, Source

log = logging.getLogger("fleetscope.agent.sources")

__all__ = ["REGISTRY", "NoData", "Reading", "Source", "build_sources"]


_FROM_CONFIG = object()


def build_sources(config, *, workload_lookup=None, slurm=None, pod_resources=_FROM_CONFIG) -> list[Source]:
    """Instantiate every enabled source, each with all it needs (nothing is wired after it is built);
    one that fails to start is logged and left out.

    `pod_resources` is the kubelet's PodResources client the GPU source labels GPUs with (the agent's own, shared
    with its listener; by default one made from config.pod_resources_socket).
    `workload_lookup(pid)` names the training job and rank of a process (from the listener's events); `slurm` (an
    agent.slurm.SlurmAttribution) names the Slurm job of a process and the jobs on the node."""
    unknown = set(config.disable_sources) - set(REGISTRY)
    if unknown:
        raise ValueError(f"unknown source(s) to disable: {', '.join(sorted(unknown))}; known: {', '.join(sorted(REGISTRY))}")
    sources: list[Source] = []
    for name, reg in REGISTRY.items():
        if name in config.disable_sources or not reg.default_enabled:
            continue
        kwargs: dict[str, object] = {"exclude_interfaces": config.exclude_interfaces, "procfs": config.procfs, "sysfs": config.sysfs,
                                   "rootfs": config.rootfs, "inference_servers": config.inference_servers,
                                   "node": config.node, "workload_lookup": workload_lookup,
                                   "slurm": slurm}
        if name == "gpu":
            if config.scenario and config.gpu_backend != "simulated":
                raise ValueError("a fault scenario plays on simulated GPUs only: add --gpu-backend simulated")
            kwargs["backend"] = make_backend(config.gpu_backend, gpus=config.gpus, seed=config.seed, node=config.node,
                                                 scenario=config.scenario)
            kwargs["expected_gpus"] = config.expected_gpus
            kwargs["compat_dcgm"] = "dcgm" in config.compat
            kwargs["hostname"] = config.node
            kwargs["pod_resources"] = (make_pod_resources_client(config.pod_resources_socket)
                                       if pod_resources is _FROM_CONFIG else pod_resources)
        try:
            sources.append(reg.factory(**kwargs))
        except Exception:
            log.exception("source %s failed to start; it stays disabled", name)
    return sources
