"""InfiniBand / RDMA ports from /sys/class/infiniband: state, rate, traffic and error counters.

psutil does not see these; GPU clusters move their all-reduce traffic over them. Counter files
follow the kernel's names; port_rcv_data and port_xmit_data count 4-byte words (per the
InfiniBand spec), so they are multiplied by 4. A counter file a driver does not provide is
left out. The ports present and their link layers are listed every SLOW_REFRESH_S; their state,
rate and counters are read at every sample.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from agent.procfs import KeptFiles, read_text
from agent.sources.base import Family, NoData, Slow, Source, feeding, reading, register

P = ("device", "port")

# (counters/ file, metric suffix, multiplier, help)
_COUNTERS = (
    ("port_rcv_data", "receive_bytes_total", 4, "Bytes received."),
    ("port_xmit_data", "transmit_bytes_total", 4, "Bytes transmitted."),
    ("port_rcv_packets", "receive_packets_total", 1, "Packets received."),
    ("port_xmit_packets", "transmit_packets_total", 1, "Packets transmitted."),
    ("port_rcv_errors", "receive_errors_total", 1, "Received packets with errors."),
    ("port_xmit_discards", "transmit_discards_total", 1, "Outbound packets discarded because the port was down or congested."),
    ("port_xmit_wait", "transmit_wait_total", 1, "Ticks the port had data to send but no credits (congestion)."),
    ("link_downed", "link_downed_total", 1, "Times the link failed its error recovery and went down."),
    ("link_error_recovery", "link_error_recovery_total", 1, "Times the link recovered from errors."),
    ("symbol_error", "symbol_errors_total", 1, "Minor link errors on the physical lanes."),
    ("local_link_integrity_errors", "local_link_integrity_errors_total", 1, "Local physical errors beyond the threshold."),
    ("excessive_buffer_overrun_errors", "excessive_buffer_overrun_errors_total", 1, "Consecutive buffer overruns."),
    ("port_rcv_remote_physical_errors", "receive_remote_physical_errors_total", 1, "Packets marked bad by an upstream port."),
)


def parse_state(text: str) -> tuple[int, str]:
    """'4: ACTIVE' -> (4, 'ACTIVE')."""
    number, _, name = text.strip().partition(":")
    return int(number), name.strip()


def parse_rate(text: str) -> float | None:
    """'400 Gb/sec (4X NDR)' -> bytes per second."""
    m = re.match(r"\s*([\d.]+)\s*Gb/sec", text)
    return float(m.group(1)) * 1e9 / 8 if m else None


@register("infiniband")
class InfinibandSource(Source):
    name = "infiniband"
    families = (
        Family("fleetscope_infiniband_info", "gauge", "Port identity; the value is always 1.", P + ("link_layer", "rate")),
        Family("fleetscope_infiniband_port_state", "gauge", "Logical port state: 1 down, 2 init, 3 armed, 4 active.", P),
        Family("fleetscope_infiniband_port_up", "gauge", "1 when the port is active and its physical link is up.", P),
        Family("fleetscope_infiniband_rate_bytes", "gauge", "Link rate in bytes per second.", P),
        *(Family(f"fleetscope_infiniband_{suffix}", "counter", help_, P) for _, suffix, _, help_ in _COUNTERS),
    )
    families = feeding(families, {f"fleetscope_infiniband_{n}": "infiniband_errors_total" for n in (
        "symbol_errors_total", "receive_errors_total", "link_downed_total", "transmit_discards_total")})

    def __init__(self, *, sysfs: str = "/sys", **_: object) -> None:
        self.root = Path(sysfs) / "class" / "infiniband"
        self._ports: Slow[list[tuple[str, str, str, str]] | None] = Slow(self._find)
        self._files = KeptFiles()

    def _find(self) -> list[tuple[str, str, str, str]] | None:
        """(port folder, device, port, link layer) of each port, or None without the class folder."""
        if not self.root.is_dir():
            return None
        return [(str(d), d.parent.parent.name, d.name, (read_text(d / "link_layer") or "").strip())
                for d in sorted(self.root.glob("*/ports/*"))]

    def collect(self):
        ports = self._ports.get()
        if ports is None:
            raise NoData(f"no {self.root} (no InfiniBand or RoCE adapter)")
        out = []
        for port_dir, device, port, link_layer in ports:
            ids = {"device": device, "port": port}
            state_text = self._files.read(f"{port_dir}/state")
            if state_text is None and not os.path.isdir(port_dir):
                continue  # the adapter went since the ports were listed
            phys_text = self._files.read(f"{port_dir}/phys_state")
            rate_text = self._files.read(f"{port_dir}/rate") or ""
            out.append(reading("fleetscope_infiniband_info", 1, **ids, link_layer=link_layer, rate=rate_text.strip()))
            if state_text is not None:
                state, _ = parse_state(state_text)
                out.append(reading("fleetscope_infiniband_port_state", state, **ids))
                phys_up = phys_text is None or parse_state(phys_text)[1] == "LinkUp"
                out.append(reading("fleetscope_infiniband_port_up", 1 if state == 4 and phys_up else 0, **ids))
            rate = parse_rate(rate_text)
            if rate is not None:
                out.append(reading("fleetscope_infiniband_rate_bytes", rate, **ids))
            for filename, suffix, mult, _ in _COUNTERS:
                text = self._files.read(f"{port_dir}/counters/{filename}")
                if text is not None and text.strip().isdigit():
                    out.append(reading(f"fleetscope_infiniband_{suffix}", int(text) * mult, **ids))
        return out

    def close(self) -> None:
        self._files.close()
