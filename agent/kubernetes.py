"""Which Kubernetes pod, namespace and container holds each GPU, from the kubelet's PodResources v1 API.

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
from dataclasses import dataclass
from typing import Iterable, Mapping

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
