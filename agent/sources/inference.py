"""Inference servers on this node (vLLM, SGLang, TGI, Triton), read from their own /metrics.

Configured in the agent's TOML as `[[agent.inference_servers]]` tables with `url`, `kind`,
`service` and, for servers that do not label their model (TGI), `model`. Each sample reads every
server once, exposes its state (up, running, waiting, KV-cache use) and hands what happened since
the previous sample (histogram and counter deltas per model, made by the shipper's frame builder from
the snapshots' cumulative readings: agent/frames.ServerFrames) to the collector as `ServerFrame`s, so
the collector treats a service read only from its servers like one instrumented with the client:
listed, charted, and in its request-rate, error and latency metrics. Which server names are read,
and why (vLLM's per-request TPOT, its finish reasons, averaging KV-cache use over data-parallel
engines), is in agent/inference_servers.py.
"""

from __future__ import annotations

import logging
import time

import httpx

from agent.inference_servers import SERVERS, ServerReading, parse
from agent.sources.base import Collected, Family, NoData, Source, reading, register

log = logging.getLogger("fleetscope.agent.inference")
S = ("service", "model")
COUNTERS = (("preemptions", "fleetscope_inference_preemptions_total"),
            ("prefix_cache_queries", "fleetscope_inference_prefix_cache_queried_tokens_total"),
            ("prefix_cache_hits", "fleetscope_inference_prefix_cache_hit_tokens_total"))


@register("inference")
class InferenceServersSource(Source):
    may_block = True  # HTTP to the servers
    name = "inference"
    families = (
        Family("fleetscope_inference_server_up", "gauge", "1 when the server's /metrics answered at the last sample.", ("service", "url")),
        Family("fleetscope_inference_requests_running", "gauge", "Requests the server is working on.", S),
        Family("fleetscope_inference_requests_waiting", "gauge", "Requests queued in the server.", S),
        Family("fleetscope_inference_kv_cache_usage_ratio", "gauge",
               "Share of the KV cache in use (0-1), averaged over the server's data-parallel engines.", S),
        Family("fleetscope_inference_preemptions_total", "counter",
               "Requests the server preempted (SGLang: retracted) to free KV cache, as the server counts them.", S),
        Family("fleetscope_inference_prefix_cache_queried_tokens_total", "counter",
               "Prompt tokens looked up in the server's prefix cache, as the server counts them.", S),
        Family("fleetscope_inference_prefix_cache_hit_tokens_total", "counter",
               "Prompt tokens found in the server's prefix cache, as the server counts them.", S),
    )

    def __init__(self, *, inference_servers: list[dict] | None = None, node: str = "", timeout_s: float = 2.0,
                 **_: object) -> None:
        self.servers = []
        for i, cfg in enumerate(inference_servers or []):
            kind = cfg.get("kind")
            if kind not in SERVERS:
                raise ValueError(f"inference_servers[{i}]: kind must be one of {', '.join(SERVERS)}, got {kind!r}")
            if not cfg.get("url") or not cfg.get("service"):
                raise ValueError(f"inference_servers[{i}]: needs `url` and `service`")
            self.servers.append({"url": cfg["url"], "kind": kind, "service": cfg["service"], "model": cfg.get("model", cfg["service"])})
        # With no server to read it cannot block: then it is not one of the sources the sampler gives a lane of their
        # own or runs last, and the GPU source, the last one that may block, runs in the sampler's own lane (one
        # thread woken a sample, not two, on a node that serves no model).
        self.may_block = bool(self.servers)
        self.node = node
        self.client = httpx.Client(timeout=timeout_s)

    def collect(self) -> Collected:
        if not self.servers:
            raise NoData("no inference servers configured")
        out = []
        servers: list[ServerReading] = []
        for server in self.servers:
            ids = {"service": server["service"], "url": server["url"]}
            try:
                resp = self.client.get(server["url"])
                resp.raise_for_status()
                models = parse(server["kind"], resp.text, server["model"])
            except Exception as exc:  # one server down must not hide the others
                log.debug("inference server %s: %s", server["url"], exc)
                out.append(reading("fleetscope_inference_server_up", 0, **ids))
                continue
            out.append(reading("fleetscope_inference_server_up", 1, **ids))
            now = time.time()
            for model, current in models.items():
                labels = {"service": server["service"], "model": model}
                for gauge, metric in (("running", "fleetscope_inference_requests_running"),
                                      ("waiting", "fleetscope_inference_requests_waiting"),
                                      ("kv_cache", "fleetscope_inference_kv_cache_usage_ratio")):
                    if gauge in current.gauges:
                        out.append(reading(metric, current.gauges[gauge], **labels))
                for counter, metric in COUNTERS:
                    if counter in current.counters:  # the server's own cumulative count: it resets when the server does
                        out.append(reading(metric, current.counters[counter], **labels))
                servers.append(ServerReading(server["url"], server["kind"], server["service"], model, now, current))
        return Collected(tuple(out), servers=tuple(servers))

    def close(self) -> None:
        self.client.close()

