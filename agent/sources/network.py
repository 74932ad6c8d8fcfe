"""Network interfaces: bytes, packets, errors, drops, link state and speed.

Per sample: the counters from /proc/net/dev (one file, as psutil reads it), each interface's flags and MTU
by ioctl on one socket kept open, and carrier_changes from sysfs. The link speed (an ethtool query, which
some NIC drivers answer from firmware, slowly) is read every SLOW_REFRESH_S, and at once for an interface
not seen before.
"""

from __future__ import annotations

import errno
import fcntl
import re
import socket
import struct
import psutil

from agent.procfs import KeptFile, KeptFiles
from agent.sources.base import Family, Reading, Slow, Source, feeding, reading, register

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
# Where each counter sits among /proc/net/dev's 16 columns (receive: bytes packets errs drop ...; transmit from 8).
_COLUMNS = {"bytes_recv": 0, "packets_recv": 1, "errin": 2, "dropin": 3,
            "bytes_sent": 8, "packets_sent": 9, "errout": 10, "dropout": 11}
_PICK = tuple((f"fleetscope_network_{name}_total", _COLUMNS[attr]) for name, attr, _ in _COUNTERS)
_SIOCGIFFLAGS, _SIOCGIFMTU = 0x8913, 0x8921
_IFF_RUNNING = 0x40  # administratively up and operationally up: what psutil calls isup
_IFREQ = struct.Struct("16si20x")  # struct ifreq: the name, then the union (flags or MTU as an int)


def parse_net_dev(text: str) -> dict[str, list[int]]:
    """/proc/net/dev: each interface's 16 counters (receive, then transmit), as the kernel prints them."""
    out = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.rpartition(":")
        if sep:
            out[name.strip()] = [int(x) for x in rest.split()]
    return out


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

    def __init__(self, *, exclude_interfaces: str = r"^lo$", sysfs: str = "/sys", procfs: str = "/proc", **_: object) -> None:
        self.exclude = re.compile(exclude_interfaces) if exclude_interfaces else None
        self.sysfs_net = f"{sysfs}/class/net"
        self.net_dev = KeptFile(f"{procfs}/net/dev")
        self._carrier = KeptFiles()
        self._sock: socket.socket | None = None
        # device -> Mbit/s as psutil reports it (0: unknown)
        self._speeds: Slow[dict[str, int]] = Slow(lambda: {name: st.speed for name, st in psutil.net_if_stats().items()})

    def _speed(self, device: str) -> int:
        speeds = self._speeds.get()
        if device not in speeds:  # a new interface: its speed now, not in a minute
            speeds = self._speeds.get(stale=True)
        return speeds.get(device, 0)

    def _flags_mtu(self, device: str) -> tuple[int, int] | None:
        """The interface's flags and MTU, or None when it has gone."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        name = device.encode()
        try:
            flags = _IFREQ.unpack(fcntl.ioctl(self._sock, _SIOCGIFFLAGS, _IFREQ.pack(name, 0)))[1] & 0xFFFF
            mtu = _IFREQ.unpack(fcntl.ioctl(self._sock, _SIOCGIFMTU, _IFREQ.pack(name, 0)))[1]
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return flags, mtu

    def collect(self):
        text = self.net_dev.read()
        if text is None:
            return
        for device, counters in parse_net_dev(text).items():
            if self.exclude and self.exclude.search(device):
                continue
            labels = (("device", device),)
            for metric, column in _PICK:
                yield Reading(metric, float(counters[column]), labels)
            got = self._flags_mtu(device)
            if got is not None:
                flags, mtu = got
                yield Reading("fleetscope_network_up", 1.0 if flags & _IFF_RUNNING else 0.0, labels)
                speed = self._speed(device)
                if speed > 0:  # psutil reports 0 when the speed is unknown: omit, never 0
                    yield Reading("fleetscope_network_speed_bytes", speed * 1_000_000 / 8, labels)
                yield Reading("fleetscope_network_mtu_bytes", float(mtu), labels)
            changes = self._carrier.read(f"{self.sysfs_net}/{device}/carrier_changes")
            if changes is not None and changes.strip().isdigit():
                yield reading("fleetscope_network_carrier_changes_total", int(changes), device=device)

    def close(self) -> None:
        self.net_dev.close()
        self._carrier.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
