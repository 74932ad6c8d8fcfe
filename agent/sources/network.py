"""Network interfaces: bytes, packets, errors, drops, link state and speed."""

from __future__ import annotations

import re
from pathlib import Path

import psutil

from agent.procfs import read_text
from agent.sources.base import Family, Source, feeding, reading, register

_COUNTERS = (
    ("receive_bytes", "bytes_recv", "Bytes received."),
    ("transmit_bytes", "bytes_sent", "Bytes transmitted."),
    ("receive_packets", "packets_recv", "Packets received."),
    ("transmit_packets", "packets_sent", "Packets transmitted."),
    ("receive_errs", "errin", "Receive errors."),
    ("transmit_errs", "errout", "Transmit errors."),
    ("receive_drop", "dropin", "Received packets dropped."),
    ("transmit_drop", "dropout", "Transmitted packets dropped."),
)


@register("network")
class NetworkSource(Source):
    name = "network"
    families = tuple(
        Family(f"fleetscope_network_{name}_total", "counter", help_, ("device",)) for name, _, help_ in _COUNTERS
    ) + (
        Family("fleetscope_network_up", "gauge", "1 when the interface is administratively and operationally up.", ("device",)),
        Family("fleetscope_network_speed_bytes", "gauge", "Link speed in bytes per second, where the driver reports it.", ("device",)),
        Family("fleetscope_network_mtu_bytes", "gauge", "Interface MTU.", ("device",)),
        Family("fleetscope_network_carrier_changes_total", "counter", "Times the link went up or down (a flapping cable or port).", ("device",)),
    )
    families = feeding(families, {
        **{f"fleetscope_network_{n}_total": "network_errors_total" for n in ("receive_errs", "transmit_errs", "receive_drop", "transmit_drop")},
        "fleetscope_network_receive_bytes_total": "network_receive_bytes_total",
        "fleetscope_network_transmit_bytes_total": "network_transmit_bytes_total",
    })

    def __init__(self, *, exclude_interfaces: str = r"^lo$", sysfs: str = "/sys", **_: object) -> None:
        self.exclude = re.compile(exclude_interfaces) if exclude_interfaces else None
        self.sysfs = Path(sysfs)

    def collect(self):
        stats = psutil.net_if_stats()
        for device, io in psutil.net_io_counters(pernic=True).items():
            if self.exclude and self.exclude.search(device):
                continue
            for name, attr, _ in _COUNTERS:
                yield reading(f"fleetscope_network_{name}_total", getattr(io, attr), device=device)
            st = stats.get(device)
            if st is not None:
                yield reading("fleetscope_network_up", 1 if st.isup else 0, device=device)
                if st.speed > 0:  # psutil reports 0 when the speed is unknown: omit, never 0
                    yield reading("fleetscope_network_speed_bytes", st.speed * 1_000_000 / 8, device=device)
                yield reading("fleetscope_network_mtu_bytes", st.mtu, device=device)
            changes = read_text(self.sysfs / "class" / "net" / device / "carrier_changes")
            if changes is not None and changes.strip().isdigit():
                yield reading("fleetscope_network_carrier_changes_total", int(changes), device=device)
