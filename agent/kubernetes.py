"""Which Kubernetes pod, namespace and container holds each GPU (the kubelet's PodResources v1 API), and which one
a process that sends events runs in (PodAttribution, at the end).

The kubelet serves PodResourcesLister (agent/podresources/api.proto) on a Unix socket that only root can
reach, /var/lib/kubelet/pod-resources/kubelet.sock; no Kubernetes RBAC is involved, only the socket mount.
Device IDs are what the device plugin registered, and are mapped as dcgm-exporter 4.5.3-4.8.2 maps them
(internal/pkg/transformation/kubernetes.go, toDeviceToPod):
- NVIDIA's device plugin: the GPU's UUID ("GPU-..."), or a MIG device's UUID ("MIG-...") under a
  resource named "nvidia.com/mig-<profile>";
- time-slicing and MPS replicas: "<id>::<n>" (also how EKS reports MIG devices): the part before "::";
- GKE's plugin: device names, "nvidia0", "nvidia0/gi3" (a MIG GPU instance), "nvidia0/vgpu2" (shared): the
  GPU index and GPU instance.
Unlike dcgm-exporter, which lets the last pod listed win, a GPU shared by several containers gets no pod
labels on its series; fleetscope_gpu_pod_info names every container on it. DRA allocations
(dynamic_resources) carry no GPU UUID that NVML would know and are not mapped.

grpcio and protobuf are the `kubernetes` extra; without them, or without the socket, the agent runs as
before, with no pod labels.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from agent.cgroup import owner_of
from agent.procfs import start_ticks

log = logging.getLogger("fleetscope.agent.kubernetes")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
LABELS = ("pod", "namespace", "container")
NO_POD = (("pod", ""), ("namespace", ""), ("container", ""))
# A node's List answer grows with its pods; gRPC's default cap (4 MiB) is reached on busy nodes.
_MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class PodResourcesUnavailable(Exception):
    """The kubelet's PodResources API did not answer: no socket, not serving, or an error."""


@dataclass(frozen=True, order=True, slots=True)
class PodRef:
    namespace: str
    pod: str
    container: str

    @property
    def labels(self) -> tuple[tuple[str, str], ...]:
        return (("pod", self.pod), ("namespace", self.namespace), ("container", self.container))


def device_key(device_id: str) -> str:
    """A device plugin's device ID as the device it names: replica and vGPU suffixes dropped."""
    device_id = device_id.partition("::")[0]  # time-slicing/MPS replica, EKS MIG: "<id>::<n>"
    return device_id.partition("/vgpu")[0]  # GKE's shared GPUs: "nvidia0/vgpu2"


def is_gpu_resource(resource_name: str, resource_names: Iterable[str] = (GPU_RESOURCE,)) -> bool:
    return resource_name in resource_names or resource_name.startswith(MIG_RESOURCE_PREFIX)


def owners(response, resource_names: Iterable[str] = (GPU_RESOURCE,)) -> dict[str, tuple[PodRef, ...]]:
    """A ListPodResourcesResponse -> the containers holding each GPU device, by device_key (pure)."""
    names = tuple(resource_names)
    held: dict[str, set[PodRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            ref = PodRef(pod.namespace, pod.name, container.name)
            for devices in container.devices:
                if not is_gpu_resource(devices.resource_name, names):
                    continue
                for device_id in devices.device_ids:
                    held.setdefault(device_key(device_id), set()).add(ref)
    return {key: tuple(sorted(refs)) for key, refs in held.items()}


class Assignment:
    """Who holds which GPU and MIG instance, at one List: looked up by UUID, else by GKE's device names."""

    def __init__(self, held: Mapping[str, tuple[PodRef, ...]]) -> None:
        self.held = dict(held)

    def of_gpu(self, uuid: str, index: int) -> tuple[PodRef, ...]:
        return self.held.get(uuid) or self.held.get(f"nvidia{index}") or ()

    def of_mig(self, uuid: str, index: int, gpu_instance: int | None) -> tuple[PodRef, ...]:
        found = self.held.get(uuid)
        if not found and gpu_instance is not None:
            found = self.held.get(f"nvidia{index}/gi{gpu_instance}")
        return found or ()

    @staticmethod
    def labels(refs: tuple[PodRef, ...]) -> tuple[tuple[str, str], ...]:
        """pod, namespace and container of the one container holding a device; empty when none or several do."""
        return refs[0].labels if len(refs) == 1 else NO_POD


class PodResourcesClient:
    """A client of the kubelet's PodResourcesLister on a Unix socket; one channel, reconnected by gRPC as
    the kubelet restarts (it recreates the socket)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout_s: float = 2.0,
                 resource_names: Iterable[str] = (GPU_RESOURCE,)) -> None:
        import grpc  # the `kubernetes` extra

        from agent.podresources import api_pb2, api_pb2_grpc

        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.resource_names = tuple(resource_names)
        self._grpc, self._pb = grpc, api_pb2
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}",
                                              options=[("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)])
        self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)

    def _call(self, method: str, request):
        if not os.path.exists(self.socket_path):
            raise PodResourcesUnavailable(
                f"no kubelet pod-resources socket at {self.socket_path}: mount the host's /var/lib/kubelet/pod-resources "
                "there (deploy/kubernetes), or set pod_resources_socket = \"\" where there is no kubelet")
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise PodResourcesUnavailable(f"kubelet PodResources {method} on {self.socket_path} failed: "
                                          f"{getattr(code, 'name', code)}: {details}") from None

    def list(self):
        """The kubelet's ListPodResourcesResponse."""
        return self._call("List", self._pb.ListPodResourcesRequest())

    def allocatable(self) -> dict[str, tuple[str, ...]]:
        """The GPU devices the kubelet may hand out, by resource name (GetAllocatableResources)."""
        response = self._call("GetAllocatableResources", self._pb.AllocatableResourcesRequest())
        found: dict[str, list[str]] = {}
        for devices in response.devices:
            if is_gpu_resource(devices.resource_name, self.resource_names):
                found.setdefault(devices.resource_name, []).extend(devices.device_ids)
        return {name: tuple(ids) for name, ids in found.items()}

    def assignment(self) -> Assignment:
        return Assignment(owners(self.list(), self.resource_names))

    def close(self) -> None:
        self._channel.close()


def make_client(socket_path: str | None) -> PodResourcesClient | None:
    """The agent's client: `socket_path` None means the kubelet's default where that socket exists, "" none."""
    if socket_path is None:
        if not os.path.exists(DEFAULT_SOCKET):
            return None
        socket_path = DEFAULT_SOCKET
    if not socket_path:
        return None
    try:
        return PodResourcesClient(socket_path)
    except ImportError as exc:
        log.warning("pod_resources_socket is %s, but grpcio/protobuf are not installed (%s): GPUs get no pod labels; "
                    "pip install 'fleetscope[kubernetes]'", socket_path, exc)
        return None


# --- the pod of a process, for the events it sends ---------------------------------------------------------------
RECHECK_S = 5.0  # how often a cached pid's start time is checked again (pids get reused)
_INDEX_EVERY_S = 1.0  # the log folders are listed again at most this often, and only for a pod not yet seen


def parse_pod_dir(name: str) -> tuple[str, str, str] | None:
    """A kubelet pod log folder's name, <namespace>_<pod>_<uid> -> (namespace, pod, uid); None for anything else.
    Neither a namespace, a pod name nor a UID can hold "_" (DNS names, a UUID)."""
    parts = name.split("_")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def parse_container_log(name: str) -> tuple[str, str, str, str] | None:
    """A kubelet container log link's name, <pod>_<namespace>_<container>-<container id>.log ->
    (namespace, pod, container, container id); None for anything else."""
    if not name.endswith(".log"):
        return None
    parts = name[:-4].split("_")
    if len(parts) != 3:
        return None
    container, dash, cid = parts[2].rpartition("-")
    if not (dash and container and len(cid) >= 12 and all(c in "0123456789abcdef" for c in cid)):
        return None
    return parts[1], parts[0], container, cid


class PodAttribution:
    """The pod, namespace and container of a process, for the events it sends over the Unix socket (the kernel
    names the sender): what the agent itself can vouch for, never what the process claims.

    The process's cgroup names its pod UID and container id (agent/cgroup.py). The kubelet names both on the node,
    in its log folders: /var/log/pods/<namespace>_<pod>_<uid>/<container>/ and the links
    /var/log/containers/<pod>_<namespace>_<container>-<container id>.log (read under the agent's rootfs: the
    DaemonSet mounts the host's / at /host). The container is the one whose id the cgroup shows, else the pod's
    only container. Where the log folders are not there, the kubelet's PodResources List stands in: the one
    container the kubelet gave the GPU that NVML lists the process on (`gpu_of(pid)` -> (uuid, index)); a process
    that holds no GPU, or one that several containers share, is not named that way.

    Each pid is looked up once per process (pid and start time), not at every event."""

    def __init__(self, procfs: str = "/proc", log_root: str | None = "/var/log", assignment=None, gpu_of=None,
                 clock=time.monotonic) -> None:
        self.procfs = procfs
        self.log_root = log_root
        self.assignment = assignment  # () -> Assignment (PodResourcesClient.assignment), or None
        self.gpu_of = gpu_of  # pid -> (GPU uuid, index) that NVML lists the process on, or None
        self.clock = clock
        self._pids: dict[int, tuple[str | None, dict | None, float]] = {}  # pid -> (start time, wire, checked)
        self._lock = threading.Lock()
        self._pods: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # uid -> (namespace, pod, containers)
        self._containers: dict[str, tuple[str, str, str]] = {}  # container id[:12] -> (namespace, pod, container)
        self._indexed_at = float("-inf")

    def wire(self, pid: int) -> dict | None:
        """fleetscope.schema.PodIds fields of a process's pod (verified), for an event it sent; None outside a pod."""
        now = self.clock()
        cached = self._pids.get(pid)
        if cached is not None and now - cached[2] < RECHECK_S:
            return cached[1]
        start = start_ticks(self.procfs, pid)
        if cached is not None and start is not None and cached[0] == start and cached[1] is not None:
            ids = cached[1]
        else:  # new, reused, or not found in a pod last time (the kubelet may not have written its folders yet)
            ids = self._read(pid) if start is not None else None
        with self._lock:
            self._pids[pid] = (start, ids, now)
            while len(self._pids) > 65536:
                del self._pids[next(iter(self._pids))]
        return ids

    def _read(self, pid: int) -> dict | None:
        owner = owner_of(pid, self.procfs)
        if not owner.pod_uid:
            return None
        found = self._from_logs(owner.pod_uid, owner.container)
        if found is None:
            found = self._from_pod_resources(pid)
        if found is None:
            return None
        namespace, pod, container = found
        out = {"namespace": namespace, "pod": pod, "verified": True}
        if container:
            out["container"] = container
        return out if all(0 < len(v) <= 256 for v in (namespace, pod, container or "x")) else None

    def _from_logs(self, uid: str, container_id: str) -> tuple[str, str, str] | None:
        if self.log_root is None:
            return None
        if uid not in self._pods or (container_id and container_id not in self._containers):
            self._index()
        pod = self._pods.get(uid)
        if pod is None:
            return None
        namespace, name, containers = pod
        by_id = self._containers.get(container_id) if container_id else None
        if by_id is not None and by_id[:2] == (namespace, name):
            return namespace, name, by_id[2]
        return namespace, name, containers[0] if len(containers) == 1 else ""

    def _index(self) -> None:
        now = self.clock()
        if now - self._indexed_at < _INDEX_EVERY_S:
            return
        self._indexed_at = now
        pods: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        containers: dict[str, tuple[str, str, str]] = {}
        try:
            with os.scandir(os.path.join(self.log_root, "pods")) as entries:
                for entry in entries:
                    parsed = parse_pod_dir(entry.name)
                    if parsed is None:
                        continue
                    try:
                        names = tuple(sorted(n for n in os.listdir(entry.path) if not n.startswith(".")))
                    except OSError:
                        names = ()
                    pods[parsed[2]] = (parsed[0], parsed[1], names)
        except OSError:
            pass
        try:
            for name in os.listdir(os.path.join(self.log_root, "containers")):
                parsed = parse_container_log(name)
                if parsed is not None:
                    containers[parsed[3][:12]] = parsed[:3]
        except OSError:
            pass
        self._pods, self._containers = pods, containers

    def _from_pod_resources(self, pid: int) -> tuple[str, str, str] | None:
        if self.assignment is None or self.gpu_of is None:
            return None
        gpu = self.gpu_of(pid)
        if gpu is None:
            return None
        try:
            refs = self.assignment().of_gpu(*gpu)
        except PodResourcesUnavailable:
            return None
        return (refs[0].namespace, refs[0].pod, refs[0].container) if len(refs) == 1 else None
