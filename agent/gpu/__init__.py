"""Everything GPU: the NVML gateway (the only importer of pynvml), the simulator and its fault
scenarios, the per-GPU state, health verdicts, the XID catalogue, dcgm-exporter compatibility and
the backend factory."""
