"""Events get the pod, namespace and container of their sender: read by the agent for a Unix-socket sender (its
cgroup, the kubelet's log folders, else the kubelet's PodResources answer for its GPU), claimed by the client over UDP."""

from __future__ import annotations

import os
import socket

import msgspec
import pytest

from agent.kubernetes import PodAttribution, parse_container_log, parse_pod_dir
from agent.listener import Listener
from fleetscope.schema import PodIds, decode_event

UID = "0a1b2c3d-0000-1111-2222-333344445555"
CID = "c0ffee" + "12" * 29  # 64 hex digits
CGROUP = ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + UID.replace("-", "_") +
          ".slice/cri-containerd-" + CID + ".scope\n")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def fake_proc(root, pid: int, cgroup: str, start: int = 1000) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{pid} (python3) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n")
    (d / "cgroup").write_text(cgroup)


def fake_logs(root, namespace: str, pod: str, uid: str, containers: dict[str, str]) -> None:
    """The kubelet's folders: /var/log/pods/<ns>_<pod>_<uid>/<container>/0.log, /var/log/containers/ links."""
    for name, cid in containers.items():
        folder = root / "pods" / f"{namespace}_{pod}_{uid}" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "0.log").write_text("")
        (root / "containers").mkdir(exist_ok=True)
        (root / "containers" / f"{pod}_{namespace}_{name}-{cid}.log").symlink_to(folder / "0.log")


def test_the_kubelet_s_log_folder_names_parse_and_nothing_else_does():
    assert parse_pod_dir(f"serving_vllm-0_{UID}") == ("serving", "vllm-0", UID)
    assert parse_pod_dir("serving_vllm-0") is None and parse_pod_dir("a_b_c_d") is None
    assert parse_container_log(f"vllm-0_serving_vllm-{CID}.log") == ("serving", "vllm-0", "vllm", CID)
    assert parse_container_log(f"vllm-0_serving_log-shipper-{CID}.log") == ("serving", "vllm-0", "log-shipper", CID)
    assert parse_container_log(f"vllm-0_serving_vllm-{CID}") is None  # not a .log
    assert parse_container_log("vllm-0_serving_vllm-notanid.log") is None


def test_a_process_in_a_pod_is_named_from_its_cgroup_and_the_log_folders_once_per_process(tmp_path):
    proc, logs, clock = tmp_path / "proc", tmp_path / "log", Clock()
    fake_proc(proc, 42, CGROUP)
    fake_logs(logs, "serving", "vllm-0", UID, {"vllm": CID, "sidecar": "ab" * 32})
    pods = PodAttribution(str(proc), str(logs), clock=clock)
    assert pods.wire(42) == {"namespace": "serving", "pod": "vllm-0", "container": "vllm", "verified": True}
    assert msgspec.convert(pods.wire(42), PodIds) == PodIds("serving", "vllm-0", "vllm", True)
    fake_proc(proc, 7, "0::/user.slice/user-1000.slice/session-3.scope\n")
    assert pods.wire(7) is None  # not in a pod
    assert pods.wire(8) is None  # no such process
    # the pid is reused by a process of another pod: read again once its start time is checked
    other = "9" * 8 + UID[8:]
    fake_proc(proc, 42, CGROUP.replace(UID.replace("-", "_"), other.replace("-", "_")), start=2000)
    fake_logs(logs, "research", "notebook-1", other, {"jupyter": "ef" * 32})
    clock.t += 1
    assert pods.wire(42)["pod"] == "vllm-0"  # the cache answers within RECHECK_S
    clock.t += 10
    # the container id in the cgroup is another; the pod's only container is it
    assert pods.wire(42) == {"namespace": "research", "pod": "notebook-1", "container": "jupyter", "verified": True}


def test_a_pod_started_after_the_agent_looked_is_found_on_a_later_look(tmp_path):
    proc, logs, clock = tmp_path / "proc", tmp_path / "log", Clock()
    fake_proc(proc, 42, CGROUP)
    (logs / "pods").mkdir(parents=True)
    pods = PodAttribution(str(proc), str(logs), clock=clock)
    assert pods.wire(42) is None  # the kubelet has not made its folder yet
    fake_logs(logs, "serving", "vllm-0", UID, {"vllm": CID})
    clock.t += 10
    assert pods.wire(42)["pod"] == "vllm-0"


def test_without_log_folders_the_kubelet_s_pod_resources_name_the_one_container_on_the_process_s_gpu(tmp_path):
    grpc = pytest.importorskip("grpc", reason="grpcio is the kubernetes extra (make test installs it)")
    from tests.agent.test_kubernetes import Kubelet  # the real kubelet proto over a Unix socket
    from agent.kubernetes import PodResourcesClient
    from agent.podresources import api_pb2_grpc
    import shutil
    import tempfile
    from concurrent import futures
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="kubelet-", dir="/tmp"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = Kubelet()
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"unix://{folder / 'kubelet.sock'}")
    server.start()
    client = PodResourcesClient(str(folder / "kubelet.sock"), timeout_s=2)
    try:
        proc = tmp_path / "proc"
        for pid in (42, 43, 44):
            fake_proc(proc, pid, CGROUP)
        gpus = {42: ("GPU-aaaa", 0), 43: ("GPU-bbbb", 1)}  # GPU-bbbb is time-sliced between two pods
        pods = PodAttribution(str(proc), str(tmp_path / "no-logs"), assignment=client.assignment, gpu_of=gpus.get)
        assert pods.wire(42) == {"namespace": "serving", "pod": "vllm-0", "container": "vllm", "verified": True}
        assert pods.wire(43) is None  # shared: which of the two is not known
        assert pods.wire(44) is None  # holds no GPU
        servicer.error = grpc.StatusCode.UNAVAILABLE
        fake_proc(proc, 45, CGROUP)
        gpus[45] = ("GPU-aaaa", 0)
        assert pods.wire(45) is None  # the kubelet does not answer: nothing, and no exception
    finally:
        client.close()
        server.stop(None)
        shutil.rmtree(folder, ignore_errors=True)


STEP = (b'{"v":1,"kind":"step","job":"j","rank":0,"world_size":1,"step":1,"ts":1.0,"duration_s":0.1,"pid":%d,'
        b'"pod":{"namespace":"default","pod":"impostor"%s}}')


def test_events_of_a_unix_sender_in_a_pod_get_its_pod_verified_and_udp_events_keep_the_client_s_claim(tmp_path):
    proc, logs = tmp_path / "proc", tmp_path / "log"
    fake_proc(proc, os.getpid(), CGROUP)  # this very process, as the kernel names it to the listener
    fake_logs(logs, "training", "llama-worker-3", UID, {"trainer": CID})
    got = []
    path = str(tmp_path / "events.sock")
    listener = Listener(f"unix:{path},127.0.0.1:0", node="n1", deliver=got.append,
                        pod_lookup=PodAttribution(str(proc), str(logs)).wire)
    try:
        claim = STEP % (os.getpid(), b"")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(claim, path)
        listener.unix_sock.setblocking(False)
        listener._drain_unix(listener.unix_sock)
        assert got[-1].pod == PodIds("training", "llama-worker-3", "trainer", verified=True)
        assert decode_event(msgspec.json.encode(got[-1])).pod.verified  # as the collector receives it
        # over UDP nothing vouches for the sender: the client's description stays, unverified even if it says so
        event = listener.handle(STEP % (os.getpid(), b',"verified":true'), ("127.0.0.1", 5555), None)
        assert event.pod == PodIds("default", "impostor", verified=False)
        # a Unix sender the agent finds in no pod keeps its own description, unverified
        event = listener.handle(STEP % (1, b',"verified":true'), None, (1, 0, 0))
        assert event.pod == PodIds("default", "impostor", verified=False)
        # an event without a pod, from a sender in none, has none
        event = listener.handle(STEP.replace(b',"pod":{"namespace":"default","pod":"impostor"%s}', b"") % 1,
                                None, (1, 0, 0))
        assert event.pod is None
    finally:
        listener.stop()
