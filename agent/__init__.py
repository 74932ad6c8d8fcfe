"""fleetscope agent: samples a node's GPUs and host, serves /metrics, ships events to the collector."""
