"""The listener validates client datagrams and adds the node and GPU."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

import fleetscope
from agent.listener import MAX_EVENT_BYTES, Listener, SenderLimits, credentials, parse_events_address
from fleetscope.client import Emitter
from tests.conftest import wait_until

STEP = {"v": 1, "kind": "step", "job": "j", "rank": 0, "local_rank": 2, "world_size": 4, "step": 0, "ts": 1.0, "duration_s": 0.5, "pid": 77}


@pytest.fixture
def listener():
    got = []
    lst = Listener("127.0.0.1", 0, node="gpu-007", deliver=got.append,
                   gpu_lookup=lambda pid, local_rank: f"GPU-of-pid-{pid}" if pid == 77 else None)
    lst.delivered = got
    yield lst
    lst.stop()


def test_events_are_enriched_with_node_and_gpu(listener):
    event = listener.handle(json.dumps(STEP).encode())
    assert event.node == "gpu-007" and event.gpu_uuid == "GPU-of-pid-77"
    assert listener.delivered == [event]
    assert listener.received["step"] == 1


def test_a_client_cannot_claim_another_node(listener):
    event = listener.handle(json.dumps({**STEP, "node": "elsewhere", "gpu_uuid": "GPU-x", "pid": 5}).encode())
    assert event.node == "gpu-007" and event.gpu_uuid is None


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"not json", "invalid"),
        (json.dumps({**STEP, "duration_s": "slow"}).encode(), "invalid"),
        (json.dumps({**STEP, "v": 9}).encode(), "version"),
        (b"{" + b" " * MAX_EVENT_BYTES + b"}", "too_large"),
    ],
)
def test_bad_datagrams_are_refused_counted_and_not_delivered(listener, data, reason):
    assert listener.handle(data) is None
    assert listener.rejected[reason] == 1 and listener.delivered == []


def test_over_a_real_socket_from_the_client(listener):
    listener.start()
    run = fleetscope.training(job="sock", rank=1, world_size=2, local_rank=0, emitter=Emitter(listener.address))
    for _ in range(20):
        with run.step(tokens=1):
            pass
    wait_until(lambda: len(listener.delivered) == 20, timeout=5, what="20 events")
    assert [e.step for e in listener.delivered] == list(range(20))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(b"garbage", listener.address)
    sock.close()
    wait_until(lambda: listener.rejected["invalid"] == 1, timeout=5, what="the garbage to be refused")


def nested(depth: int) -> bytes:
    return json.dumps({**STEP, "metrics": {}}).encode()[:-1] + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("data, reason", [
    (nested(20_000), "too_deep"),  # in a field the decoder would skip
    (b'{"a":' * 9000 + b"1" + b"}" * 9000, "too_deep"),
    (b"[" * 59_000, "invalid"),  # an outer array is plainly not an event
])
def test_deeply_nested_datagrams_are_refused_and_counted_without_a_traceback(listener, data, reason, caplog):
    for _ in range(50):
        assert listener.handle(data, ("127.0.0.1", 5000)) is None
    assert listener.rejected == {reason: 50} and listener.delivered == []
    assert len(caplog.records) == 1 and not caplog.records[0].exc_info


def test_a_deeply_nested_flood_over_the_socket_leaves_the_listener_serving(listener, caplog):
    listener.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for n in range(1, 41):  # 40 KB each, paced so the kernel's socket buffer does not drop them first
        sock.sendto(nested(20_000), listener.address)
        wait_until(lambda: listener.rejected["too_deep"] == n, timeout=5, interval=0.005, what=f"datagram {n} refused")
    sock.sendto(json.dumps(STEP).encode(), listener.address)
    sock.close()
    wait_until(lambda: len(listener.delivered) == 1, timeout=5, what="the good event after the flood")
    assert not any(r.exc_info for r in caplog.records)
    values = {r.labels: r.value for r in listener.readings() if r.name == "fleetscope_agent_events_rejected_total"}
    assert values[(("reason", "too_deep"),)] == listener.rejected["too_deep"] > 0


def test_each_sender_is_held_to_its_rate_and_others_are_not():
    clock = [0.0]
    limits = SenderLimits(events_per_s=100, bytes_per_s=1_000_000, burst_s=1.0)
    got = []
    lst = Listener("127.0.0.1", 0, node="n", deliver=got.append, limits=limits)
    try:
        flood, quiet = ("127.0.0.1", 40000), ("127.0.0.1", 40001)
        data = json.dumps(STEP).encode()
        real_allow = limits.allow
        limits.allow = lambda sender, size, now=None: real_allow(sender, size, clock[0])
        accepted = sum(lst.handle(data, flood) is not None for _ in range(1000))
        assert accepted == 100  # its burst, then nothing
        assert lst.handle(data, quiet) is not None  # another process on the node is unaffected
        clock[0] = 0.5  # half a second later: half the rate again
        assert 40 <= sum(lst.handle(data, flood) is not None for _ in range(1000)) <= 60
        values = {r.labels: r.value for r in lst.readings() if r.name == "fleetscope_agent_events_rejected_total"}
        assert values[(("reason", "rate_limited"),)] == lst.rejected["rate_limited"] > 1000
    finally:
        lst.stop()


def test_large_datagrams_are_held_to_the_byte_rate():
    limits = SenderLimits(events_per_s=10_000, bytes_per_s=100_000, burst_s=1.0)
    big = b"x" * 50_000
    assert [limits.allow("s", len(big), now=0.0) for _ in range(3)] == [True, True, False]
    assert limits.allow("s", len(big), now=0.5) is True


def test_the_sender_table_is_bounded():
    limits = SenderLimits(max_senders=10)
    for port in range(1000):
        limits.allow(("127.0.0.1", port), 100)
    assert len(limits.buckets) == 10


def test_an_unexpected_error_is_counted_and_logged_once_not_per_datagram(listener, caplog):
    listener.gpu_lookup = lambda pid, local_rank: 1 / 0
    listener.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(30):
        sock.sendto(json.dumps(STEP).encode(), listener.address)
    sock.close()
    wait_until(lambda: listener.rejected["error"] == 30, timeout=5, what="30 errors counted")
    assert sum(1 for r in caplog.records if r.exc_info) == 1


# The Unix socket: the kernel's word on who sent an event.

@pytest.fixture
def folder():
    import tempfile
    # Not tmp_path: a Unix socket's path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="fs-", dir="/tmp") as path:
        yield path


def unix_listener(folder, got, **kwargs) -> Listener:
    return Listener(f"unix:{os.path.join(folder, 'events.sock')}", node="gpu-007", deliver=got.append, **kwargs)


def test_a_unix_sender_is_known_by_the_kernel_and_its_forged_pid_is_corrected(folder):
    got = []
    seen = []
    lst = unix_listener(folder, got, gpu_lookup=lambda pid, local_rank: seen.append(pid) or None)
    lst.start()
    try:
        assert stat.S_IMODE(os.stat(lst.address).st_mode) == 0o666  # every workload user can send
        emitter = Emitter(f"unix:{lst.address}")
        assert emitter.emit({**STEP, "pid": 1})  # claims to be init
        run = fleetscope.training(job="honest", rank=0, world_size=1, emitter=emitter)
        with run.step():
            pass
        wait_until(lambda: len(got) == 2, timeout=5, what="2 events")
    finally:
        lst.stop()
    assert [e.pid for e in got] == [os.getpid(), os.getpid()] and seen == [os.getpid(), os.getpid()]
    assert lst.pid_mismatch == 1 and lst.verified["step"] == 2 == lst.received["step"]
    assert lst.workloads[os.getpid()] == ("honest", "0") and 1 not in lst.workloads
    values = {(r.name, r.labels): r.value for r in lst.readings()}
    assert values[("fleetscope_agent_events_pid_mismatch_total", ())] == 1
    assert values[("fleetscope_agent_events_verified_total", (("kind", "step"),))] == 2
    assert not os.path.exists(os.path.join(folder, "events.sock"))  # unlinked at stop


def test_credentials_are_read_from_the_ancillary_data():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        a.send(b"{}")
        _, ancdata, _, _ = b.recvmsg(100, socket.CMSG_SPACE(12))
    assert credentials(ancdata) == (os.getpid(), os.getuid(), os.getgid())
    assert credentials([]) is None


def test_unix_senders_are_limited_per_uid_however_many_sockets_they_open():
    limits = SenderLimits(events_per_s=100, bytes_per_s=1_000_000, burst_s=1.0)
    got = []
    lst = Listener("127.0.0.1", 0, node="n", deliver=got.append, limits=limits)
    try:
        data = json.dumps(STEP).encode()
        real_allow = limits.allow
        limits.allow = lambda sender, size, now=None: real_allow(sender, size, 0.0)
        # 1,000 events from 1,000 pids (sockets, processes) of uid 1000: one bucket
        accepted = sum(lst.handle(data, None, (10_000 + i, 1000, 1000)) is not None for i in range(1000))
        assert accepted == 100
        assert lst.handle(data, None, (20_000, 1001, 1001)) is not None  # another user is unaffected
        assert lst.rejected["rate_limited"] == 900
        # a UDP sender is still keyed by its address and port
        assert lst.handle(data, ("127.0.0.1", 40000)) is not None
    finally:
        lst.stop()


def test_a_sender_the_kernel_cannot_see_gets_pid_0_not_its_claim(listener):
    event = listener.handle(json.dumps(STEP).encode(), None, (0, 1000, 1000))  # another pid namespace
    assert event.pid == 0 and event.gpu_uuid is None and listener.pid_mismatch == 1


def test_a_udp_claim_cannot_rename_a_pid_a_unix_sender_proved(listener):
    listener.handle(json.dumps({**STEP, "job": "real", "pid": 5}).encode(), None, (4242, 1000, 1000))
    listener.handle(json.dumps({**STEP, "job": "forged", "pid": 4242}).encode(), ("127.0.0.1", 40000))
    assert listener.workloads[4242] == ("real", "0")
    assert listener.received["step"] == 2 and listener.verified["step"] == 1


def test_both_sockets_at_once_as_split_address_hands_them_over(folder):
    from agent.config import split_address
    path = os.path.join(folder, "events.sock")
    got = []
    lst = Listener(*split_address(f"unix:{path},127.0.0.1:0", "127.0.0.1"), node="n", deliver=got.append)
    lst.start()
    try:
        assert lst.unix_path == path and lst.address[0] == "127.0.0.1" and lst.address[1] > 0
        assert lst.addresses == [f"unix:{path}", f"udp:127.0.0.1:{lst.address[1]}"]
        assert Emitter(path).emit({**STEP, "job": "unix"})
        assert Emitter(lst.address).emit({**STEP, "job": "udp"})
        wait_until(lambda: len(got) == 2, timeout=5, what="one event on each socket")
    finally:
        lst.stop()
    assert sorted(e.job for e in got) == ["udp", "unix"]
    assert lst.verified["step"] == 1 and lst.received["step"] == 2
    assert [e.pid for e in got if e.job == "udp"] == [77]  # UDP: only the claim, unverified


def test_a_stale_socket_is_replaced_a_live_one_and_other_files_are_not(folder):
    path = os.path.join(folder, "events.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(path)
    stale.close()  # an agent that died: its file stays
    lst = Listener(f"unix:{path}", node="n", deliver=lambda e: None)
    try:
        with pytest.raises(OSError, match="in use"):
            Listener(f"unix:{path}", node="n", deliver=lambda e: None)
        assert os.path.exists(path)  # the live agent keeps its socket
    finally:
        lst.stop()
    other = os.path.join(folder, "notes.txt")
    with open(other, "w") as fh:
        fh.write("mine")
    with pytest.raises(OSError, match="not a socket"):
        Listener(f"unix:{other}", node="n", deliver=lambda e: None)
    assert open(other).read() == "mine"


def test_a_group_can_be_given_the_socket_instead_of_everyone(folder):
    path = os.path.join(folder, "events.sock")
    lst = Listener(f"unix:{path}?group={os.getgid()}", node="n", deliver=lambda e: None)
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        lst.stop()


@pytest.mark.parametrize("spec, message", [
    ("unix:relative.sock", "absolute"),
    ("unix:/a.sock,unix:/b.sock", "one of each"),
    ("localhost", "neither"),
    ("unix:/a.sock?mode=0600", "only option"),
])
def test_a_bad_events_address_is_refused_with_the_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_events_address(spec)


def test_a_truncated_unix_datagram_is_refused_not_decoded(folder):
    got = []
    lst = unix_listener(folder, got)
    lst.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x" * 100_000, lst.address)  # over what the agent reads
        wait_until(lambda: lst.rejected["too_large"] == 1, timeout=5, what="the big datagram refused")
    finally:
        lst.stop()
    assert got == []


def test_the_shipped_unit_and_example_config_give_the_socket_its_folder_and_address():
    from pathlib import Path

    from fleetscope.client import DEFAULT_AGENT_SOCKET
    systemd = Path(__file__).resolve().parents[2] / "agent" / "systemd"
    unit = (systemd / "fleetscope-agent.service").read_text().splitlines()
    # the agent binds /run/fleetscope/events.sock; with UMask=0077 alone its folder would be the agent's only
    assert "RuntimeDirectory=fleetscope" in unit and "RuntimeDirectoryMode=0755" in unit
    families = next(line for line in unit if line.startswith("RestrictAddressFamilies="))
    assert "AF_UNIX" in families.split("=", 1)[1].split()
    example = (systemd / "agent.toml.example").read_text().splitlines()
    address = next(line for line in example if line.startswith("events_address")).split('"')[1]
    assert [(e.transport, e.path or e.port) for e in parse_events_address(address)] == \
        [("unix", DEFAULT_AGENT_SOCKET), ("udp", 9836)]


def test_the_agent_listens_on_a_unix_socket_alone(tmp_path):
    from agent.config import AgentConfig
    from agent.main import Agent

    path = tmp_path / "events.sock"
    agent = Agent(AgentConfig(gpu_backend="none", metrics_address="127.0.0.1:0", events_address=f"unix:{path}"))
    try:
        assert agent.listener.addresses == [f"unix:{path}"] and path.is_socket()
    finally:
        agent.listener.stop()
        agent.sampler.stop()
