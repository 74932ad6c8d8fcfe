"""Assembles and runs the agent: sources, sampler, exporter, listener and shipper."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading

import fleetscope
from agent.config import AgentConfig, split_address
from agent.exporter import AgentCollector, make_registry
from agent.exposition import MetricsServer
from agent.hugepages import collapse_heap, remap_code
from agent.kubernetes import PodAttribution, PodResourcesUnavailable, make_client as make_pod_resources_client
from agent.listener import Listener, SenderLimits
from agent.sampler import Sampler
from agent.shipper import Shipper
from agent.slurm import SlurmAttribution
from agent.sources import build_sources

log = logging.getLogger("fleetscope.agent")

HEAP_SETTLED_S = 30.0  # after start-up: the first scrapes have rendered and the heap holds what it keeps


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.shipper: Shipper | None = None
        if config.collector_url:
            if not config.collector_token and not config.tls_cert:
                raise ValueError("a collector URL needs an ingest token (FLEETSCOPE_INGEST_TOKEN_FILE) or a client "
                                 "certificate (tls_cert)")
            self.shipper = Shipper(config.collector_url, config.collector_token, agent_id=config.agent_id, node=config.node,
                                   labels=config.labels, spool_dir=config.spool_dir or None, spool_bytes=config.spool_bytes,
                                   ca_file=config.ca_file, tls_cert=config.tls_cert, tls_key=config.tls_key,
                                   max_queue_bytes=config.max_queue_bytes, max_batch_bytes=config.max_batch_bytes)
        # events_address: "unix:/path", "host:port", or one of each, comma-separated (agent/listener.py)
        # The Slurm job of a process (cgroup, environ) and the jobs the prolog registered: for the GPU process
        # series, the Slurm source and the events of Unix-socket senders.
        self.slurm = SlurmAttribution(config.procfs, config.slurm_state_dir or None)
        # The Kubernetes pod of a Unix-socket sender: its cgroup and the kubelet's log folders under the agent's
        # rootfs, else the kubelet's PodResources answer for the GPU it holds (agent/kubernetes.py).
        # The kubelet's PodResources client (None off Kubernetes): the GPU source's pod labels and the pods of senders.
        self.pod_resources = make_pod_resources_client(config.pod_resources_socket)
        self.pods = PodAttribution(config.procfs, os.path.join(config.rootfs, "var", "log"),
                                   assignment=self._pod_assignment, gpu_of=self._gpu_of_pid)
        self.listener = Listener(config.events_address, node=config.node, deliver=self._deliver, gpu_lookup=self._gpu_for,
                                 slurm_lookup=self.slurm.wire, pod_lookup=self.pods.wire,
                                 limits=SenderLimits(events_per_s=config.events_per_sender, bytes_per_s=config.bytes_per_sender))
        self.sources = build_sources(config, workload_lookup=self.listener.workloads.get, slurm=self.slurm,
                                     pod_resources=self.pod_resources)
        self.sampler = Sampler(self.sources, config.interval_s)
        if self.shipper is not None:
            self.sampler.subscribe(self.shipper.enqueue_snapshot)
        providers = [self.listener] + ([self.shipper] if self.shipper else [])
        self.collector = AgentCollector(self.sampler, providers, version=fleetscope.__version__, labels=config.labels)
        self.registry = make_registry(self.collector)
        self._metrics_security = (None, None)
        if config.web_config:  # read now, so that a bad file stops the agent before it starts anything
            from fleetscope.webconfig import load_web_config

            web = load_web_config(config.web_config)
            self._metrics_security = (web.ssl_context(), web.basic_auth())
        self._http = None
        self._stopped = threading.Event()

    def _deliver(self, event) -> None:
        if self.shipper is not None:
            self.shipper.enqueue_event(event)

    def _pod_assignment(self):
        """The kubelet's GPU assignment now, from the agent's PodResources client; raises off Kubernetes."""
        if self.pod_resources is None:
            raise PodResourcesUnavailable("no pod_resources_socket")
        return self.pod_resources.assignment()

    def _gpu_of_pid(self, pid: int) -> tuple[str, int] | None:
        """The GPU (uuid, index) that NVML lists a process on, in the latest sample."""
        snapshot = self.sampler.latest
        for gpu in snapshot.gpus if snapshot is not None else ():
            if pid in gpu.pids:
                return gpu.uuid, gpu.index
        return None

    def _gpu_for(self, pid: int, local_rank: int) -> str | None:
        """The GPU an event ran on: the GPU holding the process, else the torchrun convention local rank = GPU index."""
        snapshot = self.sampler.latest
        if snapshot is None or not snapshot.gpus:
            return None
        for gpu in snapshot.gpus:
            if pid and pid in gpu.pids:
                return gpu.uuid
        if 0 <= local_rank < len(snapshot.gpus):
            return snapshot.gpus[local_rank].uuid
        return None

    def start(self) -> None:
        self.sampler.sample_once()  # so the first scrape already has data
        self.sampler.start()
        self.listener.start()
        if self.shipper is not None:
            self.shipper.start()
        host, port = split_address(self.config.metrics_address)
        # The latest snapshot is rendered once; counters of the listener and shipper are as fresh as it.
        ssl_context, basic_auth = self._metrics_security
        self._http = MetricsServer(host, port, self.collector.render, lambda: self.sampler.latest,
                                   ssl_context=ssl_context, basic_auth=basic_auth)
        self._http.start()
        log.info(
            "agent on node %s: metrics on %s://%s:%d/metrics%s, events on %s, shipping to %s",
            self.config.node, "https" if ssl_context else "http", host, port, " (basic auth)" if basic_auth else "", ", ".join(self.listener.addresses), self.config.collector_url or "(nowhere)",
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.listener.stop()
        self.sampler.stop()
        if self.shipper is not None:
            self.shipper.stop()
        if self._http is not None:
            self._http.stop()
        log.info("agent stopped")

    def run_forever(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        # What start-up made (modules, sources, caches) lives as long as the agent: leave it out of the cycle
        # collector's passes, which otherwise walk all of it at every full collection.
        gc.freeze()
        if self.config.huge_pages:
            # Once what start-up made is in place, and again when the first scrapes have built their caches.
            if self.config.huge_page_code:
                log.debug("huge pages: %d MiB of the interpreter's code moved", remap_code())
            log.debug("huge pages: %d MiB of the heap collapsed", collapse_heap())
            if not done.wait(HEAP_SETTLED_S):
                log.debug("huge pages: %d MiB more collapsed", collapse_heap())
        done.wait()
        self.stop()
