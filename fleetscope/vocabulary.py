"""What both sides of a wire agree on, written once and imported by the agent, the collector and
`alerts/`: ports, the datagram limit, NVML's clock-event bits, GPU health states and reasons, and the
thresholds that the collector's attribution and the alert rules share.

Nothing here does anything; changing a value here changes it everywhere.
"""

from __future__ import annotations

# -- ports (defaults) ---------------------------------------------------------------------------
AGENT_METRICS_PORT = 9835
AGENT_EVENTS_PORT = 9836  # UDP, on 127.0.0.1
COLLECTOR_PORT = 9837
CONSOLE_PORT = 8501

# -- the workload event socket -------------------------------------------------------------------
MAX_DATAGRAM_BYTES = 60_000  # the client refuses a bigger event; the agent reads up to the UDP maximum
UDP_MAX_BYTES = 65_535

# -- NVML clock-event (throttle) reasons: NVML's bit values, and fleetscope's label for each -------
CLOCK_EVENT_REASONS = {
    0x0000000000000001: "gpu_idle",
    0x0000000000000002: "applications_clocks_setting",
    0x0000000000000004: "sw_power_cap",
    0x0000000000000008: "hw_slowdown",
    0x0000000000000010: "sync_boost",
    0x0000000000000020: "sw_thermal_slowdown",
    0x0000000000000040: "hw_thermal_slowdown",
    0x0000000000000080: "hw_power_brake_slowdown",
    0x0000000000000100: "display_clock_setting",
}
_BIT = {name: bit for bit, name in CLOCK_EVENT_REASONS.items()}
THERMAL_BITS = _BIT["sw_thermal_slowdown"] | _BIT["hw_thermal_slowdown"]
POWER_CAP_BIT = _BIT["sw_power_cap"]
HW_SLOWDOWN_BITS = _BIT["hw_slowdown"] | _BIT["hw_power_brake_slowdown"]
# Clock events that mean something is wrong, as opposed to idling or a power cap the operator set.
TROUBLE_EVENTS = frozenset({"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "sw_thermal_slowdown"})

# -- GPU health -----------------------------------------------------------------------------------
HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
HEALTH_STATES = (HEALTHY, DEGRADED, UNHEALTHY)
# Every reason a verdict can give (besides "xid_<code>" and the TROUBLE_EVENTS clock events), and what it means.
HEALTH_REASONS = {
    # the GPU cannot be read (fleetscope_gpu_up 0): the NVML error that says why
    "gpu_lost": "the GPU fell off the bus (NVML: GPU is lost)",
    "reset_required": "the GPU needs a reset before it can be used again",
    "gpu_not_found": "the GPU's handle no longer resolves",
    "not_ready": "the GPU does not answer yet (e.g. still initialising after a reset)",
    "unknown_error": "NVML answered with an unknown error on every vital field",
    "timeout": "NVML timed out on every vital field (often GSP timeouts)",
    "library_mismatch": "the NVML library (pynvml) and the driver do not match: the GPU cannot be identified",
    "irq_issue": "the driver gets no interrupts from the GPU (NVML: IRQ issue): it cannot talk to it",
    "insufficient_power": "a power cable of the GPU is not connected properly (NVML: insufficient power)",
    "corrupted_inforom": "the GPU's infoROM is corrupted: its serial, ECC records and more cannot be trusted",
    "invalid_state": "the GPU is in a state it cannot answer in (NVML: invalid state)",
    "insufficient_resources": "the driver has run out of resources to answer (NVML: insufficient resources)",
    "operating_system": "the operating system blocked NVML's calls to the GPU",
    "memory": "the host has no memory left for NVML's calls",
    "nvml_error": "NVML failed on every vital field with another error (fleetscope_gpu_nvml_errors_total says which)",
    # memory
    "ecc_uncorrected": "an uncorrectable ECC error since the driver loaded",
    "row_remap_failed": "a memory row could not be remapped: replace the GPU",
    "row_remap_pending": "a row remapping waits for the next GPU reset",
    "page_retirement_pending": "a page retirement waits for the next GPU reset",
    # thermals and links
    "temperature_near_slowdown": "within the margin of the GPU's own slowdown temperature",
    "pcie_width_degraded": "the PCIe link runs narrower than it can",
    "pcie_generation_degraded": "the PCIe link runs at a lower generation under load",
    "nvlink_down": "some NVLinks are down",
    "nvlink_all_down": "every NVLink is down (e.g. the fabric manager stopped)",
    # NVSwitch fabric (HGX)
    "fabric_not_ready": "the GPU's fabric registration has not completed: CUDA will not start on it",
    "fabric_registration_failed": "the fabric registration completed with an error",
    "fabric_unhealthy": "the driver reports the fabric unhealthy",
    "fabric_degraded_bandwidth": "the fabric runs with less bandwidth than it should",
}

# -- thresholds shared by the collector's attribution and the alert rules -------------------------
TEMPERATURE_MARGIN_C = 5  # a GPU this close to its own slowdown temperature is "near slowdown"
MEMORY_STALLED_SHARE = 0.10  # PSI memory "full": share of time every task stalled on memory
