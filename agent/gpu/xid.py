"""What each NVIDIA XID error means and what an operator does about it.

`severity` sorts them for alerting: "page" (the GPU or its job is broken now: drain and reset or
replace), "ticket" (usually the application, or worth a look in working hours), "info" (follows
another error). Sources: NVIDIA's XID catalogue and GPU memory error management documents.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Xid:
    code: int
    name: str
    severity: str  # page | ticket | info
    action: str


CATALOGUE: dict[int, Xid] = {x.code: x for x in (
    Xid(13, "Graphics engine exception", "ticket",
        "Usually the application (illegal memory access, bad kernel). Check the job's logs; if it repeats across jobs on this GPU, run diagnostics."),
    Xid(31, "GPU memory page fault", "ticket",
        "Usually the application accessing memory it does not own. Check the job; repeats across jobs point at the driver or hardware."),
    Xid(32, "Invalid or corrupted push buffer stream", "ticket",
        "Driver or PCIe corruption. Check PCIe replay counters and the kernel log; update the driver if it repeats."),
    Xid(38, "Driver firmware error", "page",
        "Drain the node and reset the GPU; collect nvidia-bug-report.sh for NVIDIA."),
    Xid(43, "GPU stopped processing", "ticket",
        "A user application hit a fault and was stopped; the GPU is usually fine. Check the job."),
    Xid(45, "Preemptive cleanup, due to previous errors", "info",
        "Follows another error or a killed process. Look at the XID before it."),
    Xid(48, "Double-bit ECC error", "page",
        "Uncorrectable memory error: the job on this GPU is corrupt. Drain, reset the GPU so the row is remapped; replace if remapping fails."),
    Xid(61, "Internal micro-controller breakpoint/warning", "ticket",
        "Firmware warning. Watch for XID 62 next; collect a bug report if it repeats."),
    Xid(62, "Internal micro-controller halt", "page",
        "Firmware halted: drain the node and reset the GPU."),
    Xid(63, "ECC page retirement or row remapping recorded", "page",
        "A memory row was marked bad and takes effect at the next GPU reset: drain and reset at the next opportunity."),
    Xid(64, "ECC page retirement or row remapper recording failure", "page",
        "The GPU could not record a bad row: drain and reset; if it repeats, replace the GPU."),
    Xid(68, "Video decoder (NVDEC) exception", "ticket",
        "Usually the application's video decode; reset the GPU if it repeats across jobs."),
    Xid(69, "Graphics engine class error", "ticket",
        "Usually the application; check the job."),
    Xid(74, "NVLink error", "page",
        "An NVLink failed: check NVLink error counters and the NVSwitch fabric; reset the GPU; replace the GPU or baseboard if it repeats."),
    Xid(79, "GPU has fallen off the bus", "page",
        "The GPU no longer answers on PCIe: drain the node and power-cycle it; check PCIe and power; replace the GPU if it repeats."),
    Xid(92, "High single-bit ECC error rate", "ticket",
        "Memory is degrading: schedule a reset so rows get remapped, and watch the ECC counters."),
    Xid(94, "Contained ECC error", "page",
        "An uncorrectable error was contained to one application: that job is lost; reset the GPU when it is drained."),
    Xid(95, "Uncontained ECC error", "page",
        "An uncorrectable error may have affected every application on the GPU: drain now and reset the GPU."),
    Xid(109, "Context switch timeout", "ticket",
        "Often the application; if it repeats across jobs, reset the GPU."),
    Xid(119, "GSP RPC timeout", "page",
        "The GPU System Processor stopped answering: drain and reset the GPU; update the driver if it repeats."),
    Xid(120, "GSP error", "page",
        "The GPU System Processor reported an error: drain and reset the GPU."),
    Xid(154, "GPU recovery action changed", "page",
        "The driver says the GPU needs a reset, a reboot or a drain: do what `nvidia-smi -q` reports as the recovery action."),
)}


def describe(code: int) -> Xid:
    """The catalogue entry, or a generic one for codes it does not know."""
    return CATALOGUE.get(code) or Xid(code, f"XID {code}", "ticket", "Look the code up in NVIDIA's XID catalogue and the kernel log (dmesg | grep NVRM).")
