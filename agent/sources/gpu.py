"""GPUs: identity, utilisation, memory, thermals, power, clocks and clock events, memory errors, PCIe,
NVLink, XIDs and a health verdict, from NVML or the simulator."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass

from agent.cgroup import Owner, owner_of
from agent.gpu import dcgm
from agent.gpu.health import STATES, XID_WINDOW_S, Verdict, verdict
from agent.gpu.nvml import NvmlUnavailable
from agent.gpu.state import CLOCK_EVENT_REASONS, GpuState, NvLinkState, clock_event_names
from agent.gpu.xid import CATALOGUE
from agent.kubernetes import LABELS as POD, NO_POD, Assignment, PodResourcesUnavailable
from agent.sources.base import Collected, Deferred, Family, NoData, Reading, Source, reading, register

log = logging.getLogger("fleetscope.agent.sources.gpu")

G = ("gpu", "uuid")
PROC = ("pid", "container", "pod_uid", "slurm_job", "training_job", "rank")
# Families that take the holding pod's labels on Kubernetes (agent/kubernetes.py): per GPU and per MIG instance.
# Not the per-process ones (their `container` is the process's container id, from its cgroup), nor the GPU's
# identity (fleetscope_gpu_pod_info is the one to join on).
_NOT_BY_POD = ("fleetscope_gpu_process_memory_used_bytes", "fleetscope_gpu_process_sm_utilization_ratio",
               "fleetscope_gpu_info")
POD_FAMILIES = (
    Family("fleetscope_gpu_pod_resources_up", "gauge",
           "1 when the kubelet's PodResources API answered this sample (pod labels on the GPU series), 0 when not."),
    Family("fleetscope_gpu_pod_info", "gauge",
           "A container the kubelet allocated this GPU or MIG instance (mig_uuid) to; the value is always 1.",
           G + ("mig_uuid",) + POD),
)

# (GpuState field, metric, kind, help)
_FIELDS = (
    ("utilization_ratio", "fleetscope_gpu_utilization_ratio", "gauge", "Share of the last sample period a kernel was running (0-1)."),
    ("memory_utilization_ratio", "fleetscope_gpu_memory_utilization_ratio", "gauge", "Share of the last sample period device memory was read or written (0-1)."),
    ("memory_used_bytes", "fleetscope_gpu_memory_used_bytes", "gauge", "Device memory in use."),
    ("memory_free_bytes", "fleetscope_gpu_memory_free_bytes", "gauge", "Device memory free."),
    ("memory_total_bytes", "fleetscope_gpu_memory_total_bytes", "gauge", "Device memory installed."),
    ("memory_reserved_bytes", "fleetscope_gpu_memory_reserved_bytes", "gauge", "Device memory reserved by the driver and firmware."),
    ("temperature_celsius", "fleetscope_gpu_temperature_celsius", "gauge", "GPU core temperature."),
    ("memory_temperature_celsius", "fleetscope_gpu_memory_temperature_celsius", "gauge", "HBM temperature."),
    ("temperature_slowdown_celsius", "fleetscope_gpu_temperature_slowdown_celsius", "gauge", "Temperature at which the GPU slows its clocks."),
    ("temperature_shutdown_celsius", "fleetscope_gpu_temperature_shutdown_celsius", "gauge", "Temperature at which the GPU shuts down."),
    ("power_watts", "fleetscope_gpu_power_watts", "gauge", "Power draw."),
    ("power_limit_watts", "fleetscope_gpu_power_limit_watts", "gauge", "Enforced power limit."),
    ("power_management_limit_watts", "fleetscope_gpu_power_management_limit_watts", "gauge", "Configured power management limit."),
    ("energy_joules", "fleetscope_gpu_energy_joules_total", "counter", "Energy consumed since the driver loaded."),
    ("sm_clock_hertz", "fleetscope_gpu_sm_clock_hertz", "gauge", "SM clock."),
    ("sm_clock_max_hertz", "fleetscope_gpu_sm_clock_max_hertz", "gauge", "Maximum SM clock."),
    ("memory_clock_hertz", "fleetscope_gpu_memory_clock_hertz", "gauge", "Memory clock."),
    ("memory_clock_max_hertz", "fleetscope_gpu_memory_clock_max_hertz", "gauge", "Maximum memory clock."),
    ("graphics_clock_hertz", "fleetscope_gpu_graphics_clock_hertz", "gauge", "Graphics clock."),
    ("fan_speed_ratio", "fleetscope_gpu_fan_speed_ratio", "gauge", "Fan speed as a share of its maximum (0-1)."),
    ("pstate", "fleetscope_gpu_pstate", "gauge", "Performance state (0 is the fastest, 15 the slowest)."),
    ("gr_engine_activity_ratio", "fleetscope_gpu_graphics_engine_activity_ratio", "gauge",
     "Share of time the graphics/compute engine had work (GPM, 0-1)."),
    ("encoder_utilization_ratio", "fleetscope_gpu_encoder_utilization_ratio", "gauge", "Video encoder (NVENC) utilisation (0-1)."),
    ("decoder_utilization_ratio", "fleetscope_gpu_decoder_utilization_ratio", "gauge", "Video decoder (NVDEC) utilisation (0-1)."),
    ("nvlink_ecc_data_errors", "fleetscope_gpu_nvlink_ecc_errors_total", "counter", "NVLink data-link ECC errors, all links."),
    ("sm_activity_ratio", "fleetscope_gpu_sm_activity_ratio", "gauge", "Share of time SMs had work, averaged over SMs (GPM, 0-1)."),
    ("sm_occupancy_ratio", "fleetscope_gpu_sm_occupancy_ratio", "gauge", "Resident warps as a share of the SMs' maximum (GPM, 0-1)."),
    ("tensor_activity_ratio", "fleetscope_gpu_tensor_activity_ratio", "gauge", "Share of time tensor cores were busy (GPM, 0-1)."),
    ("dram_activity_ratio", "fleetscope_gpu_dram_activity_ratio", "gauge", "Share of peak memory bandwidth used (GPM, 0-1)."),
    ("fp16_activity_ratio", "fleetscope_gpu_fp16_activity_ratio", "gauge", "Share of time the FP16 pipes were busy (GPM, 0-1)."),
    ("fp32_activity_ratio", "fleetscope_gpu_fp32_activity_ratio", "gauge", "Share of time the FP32 pipes were busy (GPM, 0-1)."),
    ("fp64_activity_ratio", "fleetscope_gpu_fp64_activity_ratio", "gauge", "Share of time the FP64 pipes were busy (GPM, 0-1)."),
)
_PCIE = (
    ("tx_bytes_per_second", "fleetscope_gpu_pcie_transmit_bytes_per_second", "gauge", "PCIe transmit throughput, as NVML samples it."),
    ("rx_bytes_per_second", "fleetscope_gpu_pcie_receive_bytes_per_second", "gauge", "PCIe receive throughput, as NVML samples it."),
    ("replays", "fleetscope_gpu_pcie_replays_total", "counter", "PCIe replays (retransmissions after link errors)."),
    ("generation", "fleetscope_gpu_pcie_link_generation", "gauge", "Current PCIe link generation (drops at idle to save power)."),
    ("generation_max", "fleetscope_gpu_pcie_link_generation_max", "gauge", "Maximum PCIe link generation of the GPU and its slot."),
    ("width", "fleetscope_gpu_pcie_link_width", "gauge", "Current PCIe link width in lanes."),
    ("width_max", "fleetscope_gpu_pcie_link_width_max", "gauge", "Maximum PCIe link width in lanes."),
)
_NVLINK_ERRORS = (("crc_flit_errors", "crc_flit"), ("crc_data_errors", "crc_data"), ("replay_errors", "replay"), ("recovery_errors", "recovery"))


def _r(metric: str, value: float, ids: tuple, *extra: tuple[str, str]) -> Reading:
    """A reading with the GPU's prebuilt label tuple: thousands of these per sample, so no dicts."""
    return Reading(metric, float(value), ids + extra if extra else ids)


_new = tuple.__new__  # _new(Reading, (name, value, labels)): a Reading without its Python-level __new__
_FIELD_METRICS = tuple((field, metric) for field, metric, _, _ in _FIELDS)
_PCIE_METRICS = tuple((field, metric) for field, metric, _, _ in _PCIE)
_CATALOGUE_CODES = frozenset(CATALOGUE)
_CATALOGUE_READINGS = tuple(reading("fleetscope_gpu_xid_catalogue_info", 1, xid=x.code, name=x.name, severity=x.severity)
                            for x in CATALOGUE.values())
# NvLinkState's error fields, in its order, with their `type` label (_NVLINK_ERRORS in NvLinkState's field order)
assert tuple(f for f, _ in _NVLINK_ERRORS) == NvLinkState._fields[4:8]


class _LabelSets:
    """The label tuples of one GPU's series (its labels `ids`, plus an XID code, a health state, a clock-event
    reason or an NVLink and error type), made once per GPU rather than at every scrape. Only what `ids` and fixed
    tables decide is kept, so a reading gets the labels it would have got built anew."""

    __slots__ = ("ids", "xid", "state", "reasons", "links")

    def __init__(self, ids: tuple) -> None:
        self.ids = ids
        self.xid = tuple((code, ids + (("xid", str(code)),)) for code in sorted(CATALOGUE))
        self.state = tuple((state, ids + (("state", state),)) for state in STATES)
        self.reasons = {reason: ids + (("reason", reason),) for reason in CLOCK_EVENT_REASONS.values()}
        self.links: dict[int, tuple[tuple, tuple[tuple, ...]]] = {}

    def link(self, n: int) -> tuple[tuple, tuple[tuple, ...]]:
        """An NVLink's labels, and its error series' (one per type, in _NVLINK_ERRORS' order)."""
        link_ids = self.ids + (("link", str(n)),)
        made = self.links[n] = (link_ids, tuple(link_ids + (("type", kind),) for _, kind in _NVLINK_ERRORS))
        return made


@dataclass(frozen=True, slots=True)
class _Sample:
    """What one sample's GPU readings are built from, fixed at the sample."""

    states: tuple[GpuState, ...]
    health: dict[str, Verdict]
    pods: Assignment | None
    clock_events: dict[str, tuple[tuple[str, int, float], ...]]  # uuid -> (reason, active, seconds so far)
    processes: dict[str, tuple[tuple[tuple, int | None, float | None], ...]]  # uuid -> (labels, memory, SM ratio)
    driver: str
    cuda: str
    error_counts: tuple[tuple[tuple[str, str, str], int], ...]  # ((uuid, call, reason), errors since start)
    nvlink_bandwidth: dict[str, int] | None  # --compat dcgm's NVLink rates


@register("gpu")
class GpuSource(Source):
    name = "gpu"
    may_block = True  # a GPU in GSP timeouts holds an NVML call for seconds
    families = (
        Family("fleetscope_gpu_info", "gauge", "GPU identity; the value is always 1.",
               ("gpu", "uuid", "name", "serial", "pci_bus_id", "vbios", "driver", "cuda_driver")),
        Family("fleetscope_gpu_up", "gauge",
               "1 when the GPU answers; 0 when it cannot be read (lost, reset required, ...: see fleetscope_gpu_health_reason).", G),
        Family("fleetscope_gpus_present", "gauge", "GPUs that answer on this node."),
        Family("fleetscope_gpus_expected", "gauge", "GPUs this node should have, from the agent's configuration."),
        *(Family(metric, kind, help_, G) for _, metric, kind, help_ in _FIELDS),
        Family("fleetscope_gpu_clock_event_active", "gauge", "1 while this clock-event (throttle) reason holds the clocks down.", G + ("reason",)),
        Family("fleetscope_gpu_clock_event_seconds_total", "counter", "Time this clock-event reason was active, as sampled by the agent.", G + ("reason",)),
        Family("fleetscope_gpu_ecc_errors_total", "counter", "ECC memory errors; volatile counts reset with the driver, aggregate ones never.", G + ("type", "counter")),
        Family("fleetscope_gpu_retired_pages_total", "counter", "Memory pages retired, by cause (GPUs before Ampere).", G + ("cause",)),
        Family("fleetscope_gpu_retired_pages_pending", "gauge", "1 when a page retirement waits for the next GPU reset.", G),
        Family("fleetscope_gpu_remapped_rows_total", "counter", "Memory rows remapped, by the error that caused it (Ampere and newer).", G + ("type",)),
        Family("fleetscope_gpu_row_remap_pending", "gauge", "1 when a row remapping waits for the next GPU reset.", G),
        Family("fleetscope_gpu_row_remap_failure", "gauge", "1 when a row remapping failed: the GPU needs replacing.", G),
        *(Family(metric, kind, help_, G) for _, metric, kind, help_ in _PCIE),
        Family("fleetscope_gpu_nvlink_up", "gauge", "1 when the NVLink is active.", G + ("link",)),
        Family("fleetscope_gpu_nvlink_transmit_bytes_total", "counter", "Data bytes sent over the NVLink.", G + ("link",)),
        Family("fleetscope_gpu_nvlink_receive_bytes_total", "counter", "Data bytes received over the NVLink.", G + ("link",)),
        Family("fleetscope_gpu_nvlink_errors_total", "counter", "NVLink data-link errors, by type.", G + ("link", "type")),
        Family("fleetscope_gpu_xid_errors_total", "counter", "XID errors seen since the agent started, by code.", G + ("xid",)),
        Family("fleetscope_gpu_xid_catalogue_info", "gauge", "What each XID code means and whether it pages; the value is always 1.",
               ("xid", "name", "severity")),
        Family("fleetscope_gpu_process_memory_used_bytes", "gauge",
               "Device memory a process holds, with the container, pod, Slurm job and training job it belongs to.", G + PROC),
        Family("fleetscope_gpu_process_sm_utilization_ratio", "gauge",
               "Share of the last sample period the process's kernels ran on the GPU (0-1).", G + PROC),
        Family("fleetscope_gpu_mig_enabled", "gauge", "1 when the GPU is partitioned into MIG instances.", G),
        Family("fleetscope_gpu_mig_info", "gauge", "One MIG instance of the GPU; the value is always 1.",
               G + ("mig_uuid", "gpu_instance", "compute_instance", "profile")),
        Family("fleetscope_gpu_mig_memory_used_bytes", "gauge", "Device memory in use in a MIG instance.", G + ("mig_uuid",)),
        Family("fleetscope_gpu_mig_memory_total_bytes", "gauge", "Device memory of a MIG instance.", G + ("mig_uuid",)),
        Family("fleetscope_gpu_mig_graphics_engine_activity_ratio", "gauge",
               "Share of time a MIG instance's graphics/compute engine had work (GPM, 0-1).", G + ("mig_uuid",)),
        Family("fleetscope_gpu_mig_sm_activity_ratio", "gauge",
               "Share of time a MIG instance's SMs had work (GPM, 0-1).", G + ("mig_uuid",)),
        Family("fleetscope_gpu_fabric_info", "gauge",
               "NVSwitch fabric registration of the GPU (HGX); the value is always 1.",
               G + ("state", "status", "clique_id", "health")),
        Family("fleetscope_gpu_data_hidden", "gauge",
               "1 for each kind of data NVML refuses to show the agent on this GPU (e.g. processes under a non-root user).",
               G + ("data", "reason")),
        Family("fleetscope_gpu_nvml_errors_total", "counter",
               "NVML calls on this GPU that failed with an error (not merely unsupported), by call and error.",
               G + ("call", "reason")),
        Family("fleetscope_gpu_health", "gauge", "1 for the GPU's current verdict (healthy, degraded, unhealthy), 0 for the others.", G + ("state",)),
        Family("fleetscope_gpu_health_reason", "gauge", "1 for each reason behind a degraded or unhealthy verdict.", G + ("reason",)),
    )

    def __init__(self, *, backend=None, expected_gpus: int | None = None, clock=time.monotonic,
                 compat_dcgm: bool = False, hostname: str = "", procfs: str = "/proc",
                 workload_lookup=None, pod_resources=None, slurm=None, **_: object) -> None:
        self.backend = backend
        # agent/kubernetes.py's client where the kubelet's pod-resources socket is configured
        self.pod_resources = pod_resources
        self._pod_error: str | None = None
        self.procfs = procfs
        # pid -> (training job, rank) from the workload events the listener saw; set by the agent
        self.workload_lookup = workload_lookup or (lambda pid: None)
        self._owners: dict[int, Owner] = {}
        self.slurm = slurm  # agent/slurm.py's SlurmAttribution: a process's Slurm job from its cgroup and environ
        self.compat_dcgm = compat_dcgm
        self.hostname = hostname
        if compat_dcgm:
            self.families = GpuSource.families + (dcgm.POD_FAMILIES if pod_resources is not None else dcgm.FAMILIES)
        if pod_resources is not None:
            self.families = tuple(_by_pod(f) for f in self.families) + POD_FAMILIES
        self._nvlink_bandwidth = dcgm.NvLinkBandwidth()
        self.expected = expected_gpus
        self.clock = clock
        self._last_t: float | None = None
        self._event_seconds: dict[tuple[str, str], float] = {}
        self._xid_history: dict[str, deque[tuple[float, dict[int, int]]]] = {}
        self._label_sets: dict[tuple, _LabelSets] = {}  # by a GPU's labels: the label tuples of its series

    def collect(self) -> Collected:
        if self.backend is None:
            raise NoData("no GPU backend")
        try:
            states = self.backend.read()
        except NvmlUnavailable as exc:
            if exc.absent:
                raise NoData(str(exc)) from exc
            raise
        now = self.clock()
        dt = 0.0 if self._last_t is None else now - self._last_t
        self._last_t = now
        health = {s.uuid: verdict(s, self._recent_xids(s, now)) for s in states}
        pods = self._assignment()
        # What the readings need from state that later samples change is taken now; the readings themselves
        # (a thousand-odd for 8 GPUs) are built only if this sample is scraped (Deferred).
        clock_events = {s.uuid: self._clock_events(s, dt) for s in states if s.up}
        processes = {s.uuid: self._process_labels(s) for s in states if s.up and s.processes}
        live = {p.pid for s in states for p in s.processes}
        for pid in set(self._owners) - live:  # pids get reused: forget processes gone from every GPU
            del self._owners[pid]
        sample = _Sample(
            states=tuple(states), health=health, pods=pods, clock_events=clock_events, processes=processes,
            driver=getattr(self.backend, "driver_version", None) or "",
            cuda=getattr(self.backend, "cuda_driver_version", None) or "",
            error_counts=tuple(getattr(self.backend, "error_counts", {}).items()),
            nvlink_bandwidth=self._nvlink_bandwidth.update(states, now) if self.compat_dcgm else None)
        return Collected(Deferred(lambda: self._all_readings(sample)), sample.states, health,
                         tuple(getattr(self.backend, "problems", ())))

    def _all_readings(self, sample: _Sample) -> list[Reading]:
        """One sample's readings, from `sample` and this source's settings only (never from state that changes)."""
        readings = self._readings(sample)
        if self.pod_resources is not None:
            readings.append(reading("fleetscope_gpu_pod_resources_up", 1 if sample.pods is not None else 0))
            readings.extend(_pod_info(sample.states, sample.pods))
        if self.compat_dcgm:
            readings.extend(dcgm.dcgm_readings(sample.states, self.hostname, sample.driver, sample.nvlink_bandwidth,
                                               pod_labels=_pod_labels(sample.pods) if self.pod_resources is not None else None))
        return readings

    def _assignment(self) -> Assignment | None:
        """This sample's pods by GPU; None (and logged once per distinct error) while the kubelet does not answer."""
        if self.pod_resources is None:
            return None
        try:
            pods = self.pod_resources.assignment()
        except PodResourcesUnavailable as exc:
            if str(exc) != self._pod_error:
                log.warning("%s; GPU series carry no pod labels until it answers", exc)
            self._pod_error = str(exc)
            return None
        if self._pod_error is not None:
            log.info("kubelet PodResources API answers again on %s", self.pod_resources.socket_path)
            self._pod_error = None
        return pods

    def _recent_xids(self, gpu: GpuState, now: float) -> dict[int, int]:
        """XIDs of this GPU within the last XID_WINDOW_S: the backend's, by when each happened, where it knows."""
        if gpu.recent_xids is not None:
            return gpu.recent_xids
        if gpu.xid_counts is None:
            return {}
        history = self._xid_history.setdefault(gpu.uuid, deque())
        history.append((now, dict(gpu.xid_counts)))
        while len(history) > 1 and history[1][0] <= now - XID_WINDOW_S:
            history.popleft()
        # Counts that existed before the first kept sample are older than the window, or from before we watched.
        base = history[0][1] if history[0][0] <= now - XID_WINDOW_S else {}
        return {code: n - base.get(code, 0) for code, n in gpu.xid_counts.items() if n - base.get(code, 0) > 0}

    def _readings(self, sample: _Sample) -> list[Reading]:
        """The sample's readings, built into one list: 200-odd per GPU, most of them with a label set made once per
        GPU (its _LabelSets), each Reading made with tuple.__new__ (a named tuple's own __new__ is Python)."""
        states, health, pods, driver, cuda = sample.states, sample.health, sample.pods, sample.driver, sample.cuda
        by_pod = self.pod_resources is not None
        errors: dict[str, list] = {}
        for key, n in sample.error_counts:
            errors.setdefault(key[0], []).append((key, n))
        out: list[Reading] = []
        add = out.append
        out.append(reading("fleetscope_gpus_present", sum(1 for s in states if s.up)))
        if self.expected is not None:
            add(reading("fleetscope_gpus_expected", self.expected))
        out += _CATALOGUE_READINGS
        label_sets = self._label_sets
        if len(label_sets) > 4 * len(states) + 64:  # GPUs, or their pods, came and went
            label_sets.clear()
        for s in states:
            gpu_ids = (("gpu", str(s.index)), ("uuid", s.uuid))
            ids = gpu_ids + _of(pods, lambda: pods.of_gpu(s.uuid, s.index)) if by_pod else gpu_ids
            sets = label_sets.get(ids)
            if sets is None:
                sets = label_sets[ids] = _LabelSets(ids)
            ids = sets.ids
            add(_new(Reading, ("fleetscope_gpu_up", 1.0 if s.up else 0.0, ids)))
            xids = s.xid_counts
            if xids is not None:
                # Every catalogued code starts at 0, so the first XID is an increase Prometheus can see.
                if xids.keys() <= _CATALOGUE_CODES:
                    get = xids.get
                    out += [_new(Reading, ("fleetscope_gpu_xid_errors_total", float(get(code, 0)), labels))
                            for code, labels in sets.xid]
                else:
                    for code in sorted(set(CATALOGUE) | set(xids)):
                        add(_r("fleetscope_gpu_xid_errors_total", xids.get(code, 0), ids, ("xid", str(code))))
            v = health[s.uuid]
            out += [_new(Reading, ("fleetscope_gpu_health", 1.0 if state == v.state else 0.0, labels))
                    for state, labels in sets.state]
            for reason in v.reasons:
                add(_r("fleetscope_gpu_health_reason", 1, ids, ("reason", reason)))
            for (uuid, call, reason), n in errors.get(s.uuid, ()):
                add(_r("fleetscope_gpu_nvml_errors_total", n, ids, ("call", call), ("reason", reason)))
            if not s.up:
                continue
            for hidden in s.hidden:
                data, _, why = hidden.partition(":")
                add(_r("fleetscope_gpu_data_hidden", 1, ids, ("data", data), ("reason", why)))
            if s.fabric is not None:
                f = s.fabric
                add(_r("fleetscope_gpu_fabric_info", 1, ids, ("state", f.state), ("status", f.status or ""),
                       ("clique_id", "" if f.clique_id is None else str(f.clique_id)), ("health", f.health or "")))
            add(reading("fleetscope_gpu_info", 1, gpu=s.index, uuid=s.uuid, name=s.name or "", serial=s.serial or "",
                        pci_bus_id=s.pci_bus_id or "", vbios=s.vbios or "", driver=driver, cuda_driver=cuda))
            for field, metric in _FIELD_METRICS:
                value = getattr(s, field)
                if value is not None:
                    add(_new(Reading, (metric, float(value), ids)))
            events = sample.clock_events.get(s.uuid, ())
            if events:
                reasons = sets.reasons
                for reason, active, seconds in events:
                    labels = reasons.get(reason) or ids + (("reason", reason),)
                    add(_new(Reading, ("fleetscope_gpu_clock_event_active", float(active), labels)))
                    add(_new(Reading, ("fleetscope_gpu_clock_event_seconds_total", float(seconds), labels)))
            for labels, used, sm in sample.processes.get(s.uuid, ()):
                if used is not None:
                    add(_r("fleetscope_gpu_process_memory_used_bytes", used, gpu_ids, *labels))
                if sm is not None:
                    add(_r("fleetscope_gpu_process_sm_utilization_ratio", sm, gpu_ids, *labels))
            out += _memory_errors(s, ids)
            out += _mig(s, gpu_ids, by_pod, pods)
            pcie = s.pcie
            if pcie is not None:
                for field, metric in _PCIE_METRICS:
                    value = getattr(pcie, field)
                    if value is not None:
                        add(_new(Reading, (metric, float(value), ids)))
            if s.nvlinks:
                links = sets.links
                for link in s.nvlinks:
                    n = link.link
                    labels = links.get(n) or sets.link(n)
                    link_ids, error_ids = labels
                    add(_new(Reading, ("fleetscope_gpu_nvlink_up", 1.0 if link.up else 0.0, link_ids)))
                    if link.tx_bytes is not None:
                        add(_new(Reading, ("fleetscope_gpu_nvlink_transmit_bytes_total", float(link.tx_bytes), link_ids)))
                    if link.rx_bytes is not None:
                        add(_new(Reading, ("fleetscope_gpu_nvlink_receive_bytes_total", float(link.rx_bytes), link_ids)))
                    # crc_flit_errors, crc_data_errors, replay_errors, recovery_errors: link[4:8], as _NVLINK_ERRORS
                    for value, labels in zip(link[4:8], error_ids):
                        if value is not None:
                            add(_new(Reading, ("fleetscope_gpu_nvlink_errors_total", float(value), labels)))
        return out

    def _clock_events(self, s: GpuState, dt: float) -> tuple[tuple[str, int, float], ...]:
        """(reason, active 0/1, seconds active so far) for each clock-event reason; the seconds grow by `dt` now."""
        if s.clock_event_mask is None:
            return ()
        active = set(clock_event_names(s.clock_event_mask))
        out = []
        for reason in CLOCK_EVENT_REASONS.values():
            key = (s.uuid, reason)
            if reason in active:
                self._event_seconds[key] = self._event_seconds.get(key, 0.0) + dt
            out.append((reason, 1 if reason in active else 0, self._event_seconds.get(key, 0.0)))
        return tuple(out)

    def _process_labels(self, s: GpuState) -> tuple[tuple[tuple, int | None, float | None], ...]:
        """(labels, memory used, SM utilisation) of each process on the GPU: who owns it is looked up now."""
        out = []
        for p in s.processes:
            owner = self._owners.get(p.pid)
            if owner is None:
                owner = self._owners[p.pid] = owner_of(p.pid, self.procfs)
            job, rank = self.workload_lookup(p.pid) or ("", "")
            slurm = self.slurm.of(p.pid) if self.slurm is not None else None
            labels = (("pid", str(p.pid)), ("container", owner.container), ("pod_uid", owner.pod_uid),
                      ("slurm_job", slurm.job if slurm is not None else owner.slurm_job), ("training_job", job),
                      ("rank", rank))
            out.append((labels, p.used_memory_bytes, p.sm_utilization_ratio))
        return tuple(out)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.shutdown()
        if self.pod_resources is not None:
            self.pod_resources.close()


def _by_pod(f: Family) -> Family:
    if f.labels[:2] != G or f.name in _NOT_BY_POD:
        return f
    return dataclasses.replace(f, labels=f.labels + POD)


def _pod_labels(pods: Assignment | None):
    """dcgm_readings' pod labels of a GPU (instance None) or of one of its MIG instances."""
    def labels(g: GpuState, m) -> tuple:
        if pods is None:
            return NO_POD
        refs = pods.of_gpu(g.uuid, g.index) if m is None else pods.of_mig(m.uuid, g.index, m.gpu_instance)
        return Assignment.labels(refs)
    return labels


def _pod_info(states, pods: Assignment | None):
    if pods is None:
        return
    for s in states:
        gpu = (("gpu", str(s.index)), ("uuid", s.uuid))
        for ref in pods.of_gpu(s.uuid, s.index):
            yield _r("fleetscope_gpu_pod_info", 1, gpu, ("mig_uuid", ""), *ref.labels)
        for m in s.mig_instances:
            for ref in pods.of_mig(m.uuid, s.index, m.gpu_instance):
                yield _r("fleetscope_gpu_pod_info", 1, gpu, ("mig_uuid", m.uuid), *ref.labels)


def _of(pods: Assignment | None, refs) -> tuple:
    """Pod labels, always all three (empty while the kubelet does not answer): the exposition caches each
    series' label text by its labels, so a series must not leave out labels that its family has."""
    return Assignment.labels(refs()) if pods is not None else NO_POD


def _mig(s: GpuState, gpu_ids: tuple, by_pod: bool, pods: Assignment | None):
    """MIG series; on Kubernetes the GPU's with its holder's labels, each instance's with its own."""
    if s.mig_enabled is None:
        return
    ids = gpu_ids + _of(pods, lambda: pods.of_gpu(s.uuid, s.index)) if by_pod else gpu_ids
    yield _r("fleetscope_gpu_mig_enabled", 1 if s.mig_enabled else 0, ids)
    for m in s.mig_instances:
        mig = ("mig_uuid", m.uuid)
        if by_pod:
            ids = gpu_ids + _of(pods, lambda: pods.of_mig(m.uuid, s.index, m.gpu_instance))
        yield _r("fleetscope_gpu_mig_info", 1, ids, mig, ("gpu_instance", _opt(m.gpu_instance)),
                 ("compute_instance", _opt(m.compute_instance)), ("profile", m.profile))
        if m.memory_used_bytes is not None:
            yield _r("fleetscope_gpu_mig_memory_used_bytes", m.memory_used_bytes, ids, mig)
        if m.memory_total_bytes is not None:
            yield _r("fleetscope_gpu_mig_memory_total_bytes", m.memory_total_bytes, ids, mig)
        if m.gr_engine_activity_ratio is not None:
            yield _r("fleetscope_gpu_mig_graphics_engine_activity_ratio", m.gr_engine_activity_ratio, ids, mig)
        if m.sm_activity_ratio is not None:
            yield _r("fleetscope_gpu_mig_sm_activity_ratio", m.sm_activity_ratio, ids, mig)


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _memory_errors(s: GpuState, ids: tuple):
    for (etype, counter), n in sorted(s.ecc_errors.items()):
        yield _r("fleetscope_gpu_ecc_errors_total", n, ids, ("type", etype), ("counter", counter))
    for cause, n in sorted(s.retired_pages.items()):
        yield _r("fleetscope_gpu_retired_pages_total", n, ids, ("cause", cause))
    if s.retired_pages_pending is not None:
        yield _r("fleetscope_gpu_retired_pages_pending", 1 if s.retired_pages_pending else 0, ids)
    rows = s.remapped_rows
    if rows is not None:
        yield _r("fleetscope_gpu_remapped_rows_total", rows.correctable, ids, ("type", "correctable"))
        yield _r("fleetscope_gpu_remapped_rows_total", rows.uncorrectable, ids, ("type", "uncorrectable"))
        yield _r("fleetscope_gpu_row_remap_pending", 1 if rows.pending else 0, ids)
        yield _r("fleetscope_gpu_row_remap_failure", 1 if rows.failure else 0, ids)
