"""The state of one GPU at one sample, as every GPU backend (NVML, simulated) reports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from fleetscope.vocabulary import CLOCK_EVENT_REASONS


def clock_event_names(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


@dataclass(frozen=True, slots=True)
class PcieState:
    tx_bytes_per_second: float | None = None
    rx_bytes_per_second: float | None = None
    replays: int | None = None
    generation: int | None = None
    generation_max: int | None = None
    width: int | None = None
    width_max: int | None = None


class NvLinkState(NamedTuple):
    """One NVLink of a GPU. A named tuple, not a frozen dataclass: an H100 has 18 links, so 144 of these are made
    per sample on an 8-GPU node, and a tuple given its fields by position is built in a fifth of the time."""

    link: int
    up: bool
    tx_bytes: float | None = None  # cumulative data bytes, from NVML field values
    rx_bytes: float | None = None
    crc_flit_errors: int | None = None
    crc_data_errors: int | None = None
    replay_errors: int | None = None
    recovery_errors: int | None = None


@dataclass(frozen=True, slots=True)
class RemappedRows:
    correctable: int
    uncorrectable: int
    pending: bool
    failure: bool


@dataclass(frozen=True, slots=True)
class MigInstance:
    uuid: str
    gpu_instance: int | None
    compute_instance: int | None
    profile: str = ""
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    # GPM on the instance (Hopper and newer): share of the last sample period its graphics engine was busy
    gr_engine_activity_ratio: float | None = None
    sm_activity_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class FabricState:
    """NVSwitch fabric registration of an HGX GPU (nvmlDeviceGetGpuFabricInfoV); None on GPUs without one."""

    state: str  # not_started | in_progress | completed
    status: str | None = None  # the registration's result once completed: "success" or NVML's error name
    clique_id: int | None = None
    health: str | None = None  # healthy | unhealthy | limited_capacity, from the health summary where the driver has it
    degraded_bandwidth: bool | None = None


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None = None
    sm_utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class GpuState:
    """A field the GPU does not support is None (or empty), never 0."""

    index: int
    uuid: str
    up: bool = True
    # Why the GPU could not be read when up is False: gpu_lost, reset_required, not_ready, unknown_error, ...
    error: str | None = None
    name: str | None = None
    serial: str | None = None
    pci_bus_id: str | None = None
    vbios: str | None = None
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    temperature_celsius: float | None = None
    memory_temperature_celsius: float | None = None
    temperature_slowdown_celsius: float | None = None
    temperature_shutdown_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None  # enforced
    power_management_limit_watts: float | None = None  # configured
    energy_joules: float | None = None
    sm_clock_hertz: float | None = None
    sm_clock_max_hertz: float | None = None
    memory_clock_hertz: float | None = None
    memory_clock_max_hertz: float | None = None
    graphics_clock_hertz: float | None = None
    fan_speed_ratio: float | None = None
    # GPM (Hopper and newer): share of the last sample period each unit was busy (0-1)
    sm_activity_ratio: float | None = None
    sm_occupancy_ratio: float | None = None
    tensor_activity_ratio: float | None = None
    dram_activity_ratio: float | None = None
    fp16_activity_ratio: float | None = None
    fp32_activity_ratio: float | None = None
    fp64_activity_ratio: float | None = None
    gr_engine_activity_ratio: float | None = None  # GPM graphics engine activity (DCGM_FI_PROF_GR_ENGINE_ACTIVE)
    encoder_utilization_ratio: float | None = None
    decoder_utilization_ratio: float | None = None
    pstate: int | None = None
    clock_event_mask: int | None = None
    # (error type "corrected"/"uncorrected", counter "volatile"/"aggregate") -> count
    ecc_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    # cause "multiple_single_bit"/"double_bit" -> pages
    retired_pages: dict[str, int] = field(default_factory=dict)
    retired_pages_pending: bool | None = None
    remapped_rows: RemappedRows | None = None
    pcie: PcieState | None = None
    nvlinks: tuple[NvLinkState, ...] = ()
    nvlink_ecc_data_errors: int | None = None  # NVLink data-link ECC errors, all links (cumulative)
    fabric: FabricState | None = None
    # XID code -> count since the agent started; None when this GPU's XIDs cannot be watched.
    xid_counts: dict[int, int] | None = None
    last_xid: int | None = None
    # XID code -> count within the last hour, by when each happened; None when the backend cannot tell
    recent_xids: dict[int, int] | None = None
    mig_enabled: bool | None = None
    mig_instances: tuple[MigInstance, ...] = ()
    # Processes with a CUDA context on this GPU.
    processes: tuple[GpuProcess, ...] = ()
    # What NVML hid from the agent on this GPU, e.g. "processes:no_permission" (logged once, exported).
    hidden: tuple[str, ...] = ()

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.processes)
