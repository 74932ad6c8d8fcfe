"""Simulated GPUs for demos and tests: values move like a training node's and repeat from a seed.

Each GPU follows a workload (busy with jitter, a short dip every few minutes as if checkpointing);
power follows utilisation, temperature follows power with a thermal time constant, and the SM
clock boosts with headroom and backs off near the slowdown temperature. Time comes from an
injectable clock so a test can step it; the same seed and the same steps give the same values.
"""

from __future__ import annotations

import math
import random
import time
import uuid as uuidlib
from typing import Callable

from agent.gpustate import GpuState

GIB = 1024**3
NAME = "NVIDIA H100 80GB HBM3 (simulated)"
MEMORY_TOTAL = 80 * GIB
IDLE_W, TDP_W = 70.0, 700.0
AMBIENT_C, C_PER_W, THERMAL_TAU_S = 28.0, 0.075, 25.0
SLOWDOWN_C = 87.0
SM_MAX_MHZ, SM_BASE_MHZ, SM_IDLE_MHZ = 1980.0, 1590.0, 345.0
MEM_CLOCK_MHZ = 2619.0


class _Gpu:
    def __init__(self, index: int, node: str, seed: int) -> None:
        self.index = index
        self.rng = random.Random(f"{seed}:{node}:{index}")
        self.uuid = "GPU-" + str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"fleetscope-sim:{seed}:{node}:{index}"))
        self.serial = f"SIM{self.rng.randrange(10**10):010d}"
        self.pci_bus_id = f"00000000:{0x18 + index * 0x10:02X}:00.0"
        self.util = 0.0
        self.temp = AMBIENT_C + self.rng.uniform(0, 4)
        self.energy = 0.0
        self.power = IDLE_W
        # Checkpoint dips are not synchronised with the wall clock so GPUs in a fleet differ a bit.
        self.period_s = 180.0 + self.rng.uniform(-20, 20)
        self.phase_s = self.rng.uniform(0, self.period_s)

    def advance(self, t: float, dt: float) -> None:
        in_checkpoint = ((t + self.phase_s) % self.period_s) < 8.0
        warming_up = t < 5.0
        target = 0.08 if (in_checkpoint or warming_up) else 0.93
        relax = 1.0 - math.exp(-dt / 1.5) if dt > 0 else 0.0
        self.util += (target - self.util) * relax + self.rng.gauss(0, 0.015)
        self.util = min(1.0, max(0.0, self.util))
        self.power = min(TDP_W, IDLE_W + (TDP_W - IDLE_W) * self.util**1.15 + self.rng.gauss(0, 8))
        self.power = max(IDLE_W * 0.8, self.power)
        t_eq = AMBIENT_C + C_PER_W * self.power
        self.temp += (t_eq - self.temp) * (1.0 - math.exp(-dt / THERMAL_TAU_S) if dt > 0 else 0.0)
        self.energy += self.power * dt
        self.t = t

    def state(self, t: float) -> GpuState:
        if self.util < 0.05:
            sm = SM_IDLE_MHZ
        else:
            headroom = 1.0 - self.power / TDP_W
            sm = SM_BASE_MHZ + (SM_MAX_MHZ - SM_BASE_MHZ) * min(1.0, 0.4 + 4 * headroom)
            if self.temp > SLOWDOWN_C - 5:  # back off as the slowdown threshold nears
                sm *= max(0.6, 1.0 - 0.08 * (self.temp - (SLOWDOWN_C - 5)))
        mem_fill = min(0.86, 0.04 + 0.82 * min(1.0, t / 60.0)) if self.util > 0.05 or t > 5 else 0.01
        used = int(MEMORY_TOTAL * mem_fill + self.rng.uniform(-0.2, 0.2) * GIB)
        used = max(0, min(MEMORY_TOTAL, used))
        return GpuState(
            index=self.index,
            uuid=self.uuid,
            name=NAME,
            serial=self.serial,
            pci_bus_id=self.pci_bus_id,
            utilization_ratio=round(self.util, 2),
            memory_utilization_ratio=round(min(1.0, self.util * 0.55), 2),
            memory_used_bytes=used,
            memory_free_bytes=MEMORY_TOTAL - used,
            memory_total_bytes=MEMORY_TOTAL,
            temperature_celsius=float(round(self.temp)),
            power_watts=round(self.power, 3),
            power_limit_watts=TDP_W,
            energy_joules=round(self.energy, 3),
            sm_clock_hertz=round(sm) * 1e6,
            sm_clock_max_hertz=SM_MAX_MHZ * 1e6,
            memory_clock_hertz=MEM_CLOCK_MHZ * 1e6,
            pstate=0 if self.util > 0.05 else 8,
        )


class SimulatedGpus:
    """A GPU backend with `read()` like `agent.nvml.Nvml`, driven by a clock."""

    def __init__(self, count: int = 8, *, seed: int = 0, node: str = "sim", clock: Callable[[], float] = time.monotonic) -> None:
        if count < 0:
            raise ValueError(f"simulated GPU count must be >= 0, got {count}")
        self.clock = clock
        self.t0 = clock()
        self.last = self.t0
        self.gpus = [_Gpu(i, node, seed) for i in range(count)]

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
            for k in range(steps):
                gpu.advance(t - dt + dt * (k + 1) / steps, dt / steps)
            out.append(gpu.state(t))
        return out
