"""Simulated GPUs for demos and tests: values move like a training node's and repeat from a seed.

Each GPU follows a workload (busy with jitter, a short dip every few minutes as if checkpointing);
power follows utilisation, temperature follows power with a thermal time constant, and the SM
clock boosts with headroom and backs off near the slowdown temperature; the graphics engine is busy a
little less than utilisation says, the video decoder a little (data loading), the encoder never. Every
GPU is registered with the node's NVSwitch fabric, as on an HGX board. A fault scenario
(`agent/gpu/scenario.py`) makes things go wrong the way NVML reports them: clock-event reasons,
XIDs, ECC counters, a GPU that is lost, NVLink errors, a narrower PCIe link. Time comes from an
injectable clock so a test can step it; the same seed and the same steps give the same values. The
demo's training ranks (fleetscope.sim.training) build the same model for the GPU each runs on (same
node, seed, scenario and start), so a GPU the agent reports throttled slows the rank on it.
"""

from __future__ import annotations

import math
import random
import time
import uuid as uuidlib
import zlib
from typing import Callable, Iterable

from agent.gpu.scenario import Fault
from agent.gpu.state import FabricState, GpuState, NvLinkState, PcieState, RemappedRows

GIB = 1024**3
NAME = "NVIDIA H100 80GB HBM3 (simulated)"
MEMORY_TOTAL, MEMORY_RESERVED = 80 * GIB, GIB // 2
IDLE_W, TDP_W = 70.0, 700.0
AMBIENT_C, C_PER_W, THERMAL_TAU_S = 28.0, 0.075, 25.0
SLOWDOWN_C, SHUTDOWN_C = 87.0, 92.0
SM_MAX_MHZ, SM_BASE_MHZ, SM_IDLE_MHZ = 1980.0, 1590.0, 345.0
MEM_CLOCK_MHZ = 2619.0
NVLINKS = 18
UTIL_TAU_S, UTIL_SIGMA = 1.5, 0.015  # utilisation's time constant and its spread about the workload's target
# NVML clock-event reason bits
IDLE, SW_POWER_CAP, HW_SLOWDOWN, SW_THERMAL, HW_THERMAL = 0x1, 0x4, 0x8, 0x20, 0x40


class _Gpu:
    def __init__(self, index: int, node: str, seed: int) -> None:
        self.index = index
        # One NVLink domain per node; its id comes from the node, not from the random stream, so the
        # other values stay what they were before the fabric was simulated.
        self.clique_id = zlib.crc32(f"{seed}:{node}".encode()) % 0x7FFF + 1
        self.rng = random.Random(f"{seed}:{node}:{index}")
        self.uuid = "GPU-" + str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"fleetscope-sim:{seed}:{node}:{index}"))
        self.serial = f"SIM{self.rng.randrange(10**10):010d}"
        self.pci_bus_id = f"00000000:{0x18 + index * 0x10:02X}:00.0"
        self.util = 0.0
        self.temp = AMBIENT_C + self.rng.uniform(0, 4)
        self.energy = 0.0
        self.power = IDLE_W
        self.demand_w = IDLE_W
        self.t = 0.0
        # Checkpoint dips are not synchronised with the wall clock so GPUs in a fleet differ a bit.
        self.period_s = 180.0 + self.rng.uniform(-20, 20)
        self.phase_s = self.rng.uniform(0, self.period_s)
        self.lost = False
        self.xids: dict[int, int] = {}
        self.last_xid: int | None = None
        self.ecc_uncorrected = 0
        self.ecc_corrected = 0
        self.rows_uncorrectable = 0
        self.remap_pending = False
        self.nvlink_crc = [0.0] * NVLINKS
        self.nvlink_bytes = 0.0  # per link and direction: all-reduce traffic spreads evenly
        self.fired: set[int] = set()  # ids of one-shot faults already applied

    def advance(self, t: float, dt: float, faults: list[Fault]) -> None:
        active = [f for f in faults if f.active(t)]
        for f in active:
            if f.kind == "xid" and id(f) not in self.fired:
                self.fired.add(id(f))
                self._xid(f.params["xid"])
            elif f.kind == "nvlink_crc_storm":
                link = int(f.params.get("link", 0)) % NVLINKS
                self.nvlink_crc[link] += float(f.params.get("errors_per_second", 2000)) * dt
        in_checkpoint = ((t + self.phase_s) % self.period_s) < 8.0
        target = 0.08 if (in_checkpoint or t < 5.0) else 0.93
        # Utilisation relaxes to its target with jitter, as an Ornstein-Uhlenbeck process: its spread is the same
        # whatever the reading cadence (a rank reads its GPU every quarter second, the agent every few seconds;
        # with a fixed draw per read the rank's GPU wandered twice as far as the agent's, and a healthy rank's
        # clock could lag its peers' by 3-7% for seconds).
        relax = 1.0 - math.exp(-dt / UTIL_TAU_S) if dt > 0 else 0.0
        jitter = UTIL_SIGMA * math.sqrt(1.0 - math.exp(-2.0 * dt / UTIL_TAU_S)) if dt > 0 else 0.0
        self.util += (target - self.util) * relax + self.rng.gauss(0, 1) * jitter
        self.util = min(1.0, max(0.0, self.util))
        self.demand_w = max(IDLE_W * 0.8, min(TDP_W, IDLE_W + (TDP_W - IDLE_W) * self.util**1.15 + self.rng.gauss(0, 8)))
        limit = self.power_limit(t, faults)
        self.power = min(self.demand_w, limit)
        cooling_lost = any(f.kind == "thermal" for f in active)
        extra_c = 32.0 if cooling_lost else 0.0
        if self.temp >= SLOWDOWN_C:
            # Hardware slowdown sheds power until the GPU holds just above its slowdown temperature, so even with
            # the cooling lost it settles there, well below its shutdown temperature (as a real GPU does).
            hold_w = max(IDLE_W * 0.5, (SLOWDOWN_C + 2.0 - AMBIENT_C - extra_c) / C_PER_W)
            self.power = min(self.power * 0.7, hold_w)
        t_eq = AMBIENT_C + C_PER_W * self.power + extra_c
        self.temp += (t_eq - self.temp) * (1.0 - math.exp(-dt / THERMAL_TAU_S) if dt > 0 else 0.0)
        self.energy += self.power * dt
        self.nvlink_bytes += self.util * 20e9 * dt  # ~20 GB/s per link and direction when busy
        self.t = t

    def _xid(self, code: int) -> None:
        self.xids[code] = self.xids.get(code, 0) + 1
        self.last_xid = code
        if code == 79:
            self.lost = True
        elif code in (48, 94, 95):
            self.ecc_uncorrected += 1
            self.rows_uncorrectable += 1
            self.remap_pending = True
        elif code == 63:
            self.remap_pending = True

    def power_limit(self, t: float, faults: list[Fault]) -> float:
        caps = [float(f.params.get("power_limit_watts", 350)) for f in faults if f.kind == "power_cap" and f.active(t)]
        return min([TDP_W, *caps])

    def state(self, t: float, faults: list[Fault]) -> GpuState:
        if self.lost:
            return GpuState(index=self.index, uuid=self.uuid, up=False, xid_counts=dict(self.xids), last_xid=self.last_xid)
        limit = self.power_limit(t, faults)
        mask = 0
        if self.util < 0.05:
            sm, mask = SM_IDLE_MHZ, IDLE
        else:
            headroom = 1.0 - self.power / TDP_W
            sm = SM_BASE_MHZ + (SM_MAX_MHZ - SM_BASE_MHZ) * min(1.0, 0.4 + 4 * headroom)
            if self.demand_w > limit + 1:
                sm *= (limit / self.demand_w) ** 0.4
                mask |= SW_POWER_CAP
        if self.temp >= SLOWDOWN_C - 3:
            mask |= SW_THERMAL
            sm *= max(0.75, 1.0 - 0.08 * (self.temp - (SLOWDOWN_C - 3)))
        if self.temp >= SLOWDOWN_C:
            mask |= HW_THERMAL | HW_SLOWDOWN
            sm *= 0.6
        mem_fill = min(0.86, 0.04 + 0.82 * min(1.0, t / 60.0)) if self.util > 0.05 or t > 5 else 0.01
        used = max(0, min(MEMORY_TOTAL - MEMORY_RESERVED, int(MEMORY_TOTAL * mem_fill + self.rng.uniform(-0.2, 0.2) * GIB)))
        width = min([16, *(int(f.params.get("width", 8)) for f in faults if f.kind == "pcie_degraded" and f.active(t))])
        busy = self.util > 0.05
        return GpuState(
            index=self.index, uuid=self.uuid, name=NAME, serial=self.serial, pci_bus_id=self.pci_bus_id, vbios="96.00.99.00.01",
            utilization_ratio=round(self.util, 2),
            memory_utilization_ratio=round(min(1.0, self.util * 0.55), 2),
            memory_used_bytes=used,
            memory_free_bytes=MEMORY_TOTAL - MEMORY_RESERVED - used,
            memory_total_bytes=MEMORY_TOTAL,
            memory_reserved_bytes=MEMORY_RESERVED,
            temperature_celsius=float(round(self.temp)),
            memory_temperature_celsius=float(round(self.temp + 4)),
            temperature_slowdown_celsius=SLOWDOWN_C,
            temperature_shutdown_celsius=SHUTDOWN_C,
            power_watts=round(self.power, 3),
            power_limit_watts=limit,
            power_management_limit_watts=limit,
            energy_joules=round(self.energy, 3),
            sm_clock_hertz=round(sm) * 1e6,
            sm_clock_max_hertz=SM_MAX_MHZ * 1e6,
            memory_clock_hertz=MEM_CLOCK_MHZ * 1e6,
            memory_clock_max_hertz=MEM_CLOCK_MHZ * 1e6,
            graphics_clock_hertz=round(sm) * 1e6,
            pstate=0 if busy else 8,
            clock_event_mask=mask,
            ecc_errors={("corrected", "volatile"): self.ecc_corrected, ("corrected", "aggregate"): self.ecc_corrected,
                        ("uncorrected", "volatile"): self.ecc_uncorrected, ("uncorrected", "aggregate"): self.ecc_uncorrected},
            remapped_rows=RemappedRows(0, self.rows_uncorrectable, self.remap_pending, False),
            pcie=PcieState(
                tx_bytes_per_second=round(self.util * 2.2e9 * self.rng.uniform(0.8, 1.2)),
                rx_bytes_per_second=round(self.util * 3.1e9 * self.rng.uniform(0.8, 1.2)),
                replays=0, generation=5 if busy else 1, generation_max=5, width=width, width_max=16,
            ),
            nvlinks=tuple(NvLinkState(link=i, up=True, tx_bytes=round(self.nvlink_bytes), rx_bytes=round(self.nvlink_bytes),
                                      crc_flit_errors=int(self.nvlink_crc[i]), crc_data_errors=0,
                                      replay_errors=0, recovery_errors=0) for i in range(NVLINKS)),
            sm_activity_ratio=round(self.util * 0.88, 3),
            sm_occupancy_ratio=round(self.util * 0.42, 3),
            tensor_activity_ratio=round(self.util * 0.61, 3),
            dram_activity_ratio=round(self.util * 0.47, 3),
            gr_engine_activity_ratio=round(self.util * 0.97, 3),
            # NVML reports the video engines in whole percents
            encoder_utilization_ratio=0.0,
            decoder_utilization_ratio=round(self.util * 0.03, 2),
            fabric=FabricState(state="completed", status="success", clique_id=self.clique_id, health="healthy"),
            xid_counts=dict(self.xids),
            last_xid=self.last_xid,
        )


class SimulatedGpus:
    """A GPU backend with `read()` like `agent.gpu.nvml.Nvml`, driven by a clock and a fault scenario."""

    driver_version = "570.124.06-sim"
    cuda_driver_version = "12.8"

    def __init__(self, count: int = 8, *, seed: int = 0, node: str = "sim", clock: Callable[[], float] = time.monotonic,
                 faults: Iterable[Fault] = (), start: float | None = None) -> None:
        """`start`: the clock's reading when the GPUs were switched on (default: now). A model built later
        with the same seed, node, faults and start (the demo's training ranks, fleetscope.sim.training)
        integrates from then at its first read, and plays the same GPUs as the agent that started then."""
        if count < 0:
            raise ValueError(f"simulated GPU count must be >= 0, got {count}")
        self.clock = clock
        self.t0 = clock() if start is None else start
        self.last = self.t0
        self.gpus = [_Gpu(i, node, seed) for i in range(count)]
        self.faults: dict[int, list[Fault]] = {}
        for f in faults:
            if not 0 <= f.gpu < count:
                raise ValueError(f"scenario: fault on GPU {f.gpu}, but there are {count} simulated GPUs")
            self.faults.setdefault(f.gpu, []).append(f)

    def init(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def read(self) -> list[GpuState]:
        now = self.clock()
        dt = max(0.0, now - self.last)
        self.last = now
        t = now - self.t0
        # Integrate in steps of at most a second so the physics do not depend on the sample interval.
        steps = max(1, math.ceil(dt))
        out = []
        for gpu in self.gpus:
            faults = self.faults.get(gpu.index, [])
            for k in range(steps):
                gpu.advance(t - dt + dt * (k + 1) / steps, dt / steps, faults)
            out.append(gpu.state(t, faults))
        return out
