"""Pod, namespace and container labels from the kubelet's PodResources API, against a real gRPC server on a Unix
socket speaking the kubelet's proto (agent/podresources), as a kubelet would."""

from __future__ import annotations

import shutil
import tempfile
from concurrent import futures
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is the kubernetes extra (make test installs it)")

from agent import kubernetes  # noqa: E402
from agent.exporter import AgentCollector  # noqa: E402
from agent.gpu.state import GpuProcess, GpuState, MigInstance  # noqa: E402
from agent.kubernetes import PodRef, PodResourcesClient, PodResourcesUnavailable, make_client, owners  # noqa: E402
from agent.podresources import api_pb2 as pb  # noqa: E402
from agent.podresources import api_pb2_grpc  # noqa: E402
from agent.sampler import Sampler  # noqa: E402
from agent.sources.gpu import GpuSource  # noqa: E402
from tests.agent.test_dcgm import parse_exposition  # noqa: E402

GIB = 2**30


def pod(name: str, namespace: str, *containers: tuple[str, list[tuple[str, list[str]]]]) -> pb.PodResources:
    return pb.PodResources(name=name, namespace=namespace, containers=[
        pb.ContainerResources(name=c, devices=[pb.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in devices])
        for c, devices in containers])


# A node as NVIDIA's device plugin reports it: whole GPUs by UUID, a time-sliced GPU's replicas ("::n"), MIG
# devices by MIG UUID under nvidia.com/mig-<profile>, and a resource that is not a GPU.
NODE = pb.ListPodResourcesResponse(pod_resources=[
    pod("vllm-0", "serving", ("vllm", [("nvidia.com/gpu", ["GPU-aaaa"])]), ("sidecar", [])),
    pod("notebook-1", "research", ("jupyter", [("nvidia.com/gpu", ["GPU-bbbb::0"])])),
    pod("notebook-2", "research", ("jupyter", [("nvidia.com/gpu", ["GPU-bbbb::1"])])),
    pod("mig-small", "batch", ("worker", [("nvidia.com/mig-3g.40gb", ["MIG-1111"])])),
    pod("nic-user", "batch", ("main", [("example.com/sriov", ["0000:3b:00.1"]), ("cpu", [])])),
    pod("idle", "default", ("main", [])),
])
ALLOCATABLE = pb.AllocatableResourcesResponse(devices=[
    pb.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=["GPU-aaaa", "GPU-bbbb::0", "GPU-bbbb::1"]),
    pb.ContainerDevices(resource_name="nvidia.com/mig-3g.40gb", device_ids=["MIG-1111", "MIG-2222"]),
    pb.ContainerDevices(resource_name="example.com/sriov", device_ids=["0000:3b:00.1"]),
], cpu_ids=[0, 1, 2])


class Kubelet(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self) -> None:
        self.response = NODE
        self.error: grpc.StatusCode | None = None

    def List(self, request, context):
        if self.error is not None:
            context.abort(self.error, "pod resources API is not ready")
        return self.response

    def GetAllocatableResources(self, request, context):
        if self.error is not None:
            context.abort(self.error, "pod resources API is not ready")
        return ALLOCATABLE


@pytest.fixture
def kubelet():
    # A short folder: a Unix socket's path is limited to 107 bytes, and pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="kubelet-", dir="/tmp"))
    servicer = Kubelet()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    socket_path = folder / "kubelet.sock"
    assert server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    servicer.socket_path, servicer.server = str(socket_path), server
    yield servicer
    server.stop(None)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def client(kubelet):
    c = PodResourcesClient(kubelet.socket_path, timeout_s=2)
    yield c
    c.close()


def test_gpus_are_mapped_to_their_containers_as_dcgm_exporter_maps_device_ids():
    held = owners(NODE)
    assert held == {
        "GPU-aaaa": (PodRef("serving", "vllm-0", "vllm"),),
        # both replicas of a time-sliced GPU are the same GPU
        "GPU-bbbb": (PodRef("research", "notebook-1", "jupyter"), PodRef("research", "notebook-2", "jupyter")),
        "MIG-1111": (PodRef("batch", "mig-small", "worker"),),
    }  # the SR-IOV NIC is not a GPU


def test_gke_device_names_map_to_gpu_index_and_gpu_instance():
    gke = pb.ListPodResourcesResponse(pod_resources=[
        pod("a", "ns", ("c", [("nvidia.com/gpu", ["nvidia0"])])),
        pod("b", "ns", ("c", [("nvidia.com/gpu", ["nvidia1/gi3"])])),
        pod("c", "ns", ("c", [("nvidia.com/gpu", ["nvidia2/vgpu1"])])),
    ])
    pods = kubernetes.Assignment(owners(gke))
    assert pods.of_gpu("GPU-unknown-to-gke", 0) == (PodRef("ns", "a", "c"),)
    assert pods.of_mig("MIG-x", 1, 3) == (PodRef("ns", "b", "c"),)
    assert pods.of_mig("MIG-y", 1, 4) == ()
    assert pods.of_gpu("GPU-z", 2) == (PodRef("ns", "c", "c"),)


def test_the_client_lists_pods_and_allocatable_gpus_from_a_kubelet(client):
    assert client.list() == NODE
    assert client.allocatable() == {"nvidia.com/gpu": ("GPU-aaaa", "GPU-bbbb::0", "GPU-bbbb::1"),
                                    "nvidia.com/mig-3g.40gb": ("MIG-1111", "MIG-2222")}
    assert client.assignment().of_gpu("GPU-aaaa", 0) == (PodRef("serving", "vllm-0", "vllm"),)


def test_a_kubelet_that_errors_is_reported_not_raised_as_grpc(kubelet, client):
    kubelet.error = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(PodResourcesUnavailable, match="List .*UNAVAILABLE: pod resources API is not ready"):
        client.list()
    kubelet.error = None
    assert client.list() == NODE  # and the same client carries on when it answers again


def test_a_missing_socket_names_the_path_and_the_mount(tmp_path, monkeypatch):
    missing = str(tmp_path / "kubelet.sock")
    c = PodResourcesClient(missing, timeout_s=0.5)
    with pytest.raises(PodResourcesUnavailable, match=f"no kubelet pod-resources socket at {missing}: mount"):
        c.assignment()
    c.close()
    # The agent's default: the kubelet's socket where it exists, else none; "" is none.
    monkeypatch.setattr(kubernetes, "DEFAULT_SOCKET", missing)
    assert make_client(None) is None
    assert make_client("") is None


def test_the_agents_default_is_the_kubelets_socket_where_it_exists(kubelet, monkeypatch):
    monkeypatch.setattr(kubernetes, "DEFAULT_SOCKET", kubelet.socket_path)
    c = make_client(None)
    assert c is not None and c.socket_path == kubelet.socket_path
    c.close()


class Backend:
    driver_version = "570.86.15"

    def __init__(self, states):
        self.states = states

    def read(self):
        return self.states

    def shutdown(self):
        pass


STATES = [
    GpuState(index=0, uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3", utilization_ratio=0.9, memory_used_bytes=GIB,
             temperature_celsius=60.0, xid_counts={}, processes=(GpuProcess(4242, used_memory_bytes=GIB),)),
    GpuState(index=1, uuid="GPU-bbbb", name="NVIDIA H100 80GB HBM3", utilization_ratio=0.4, temperature_celsius=50.0,
             xid_counts={}),
    GpuState(index=2, uuid="GPU-cccc", name="NVIDIA H100 80GB HBM3", temperature_celsius=45.0, xid_counts={},
             mig_enabled=True, mig_instances=(
                 MigInstance("MIG-1111", 1, 0, "3g.40gb", memory_used_bytes=10 * GIB, memory_free_bytes=29 * GIB,
                             memory_total_bytes=40 * GIB),
                 MigInstance("MIG-2222", 2, 0, "3g.40gb", memory_used_bytes=GIB, memory_free_bytes=38 * GIB,
                             memory_total_bytes=40 * GIB))),
    GpuState(index=3, uuid="GPU-dddd", name="NVIDIA H100 80GB HBM3", utilization_ratio=0.0, temperature_celsius=35.0,
             xid_counts={}),
]


def scrape(source: GpuSource) -> list[tuple[str, dict[str, str], str]]:
    sampler = Sampler([source])
    sampler.sample_once()
    return parse_exposition(AgentCollector(sampler, version="test").render().decode())[2]


def pods_of(samples, name: str, key: str = "uuid") -> dict[str, tuple[str, str, str]]:
    return {labels[key]: (labels.get("namespace", ""), labels.get("pod", ""), labels.get("container", ""))
            for n, labels, _ in samples if n == name}


NOBODY = ("", "", "")


def test_gpu_series_carry_the_pod_holding_the_gpu_in_fleetscope_and_dcgm_names(client):
    samples = scrape(GpuSource(backend=Backend(STATES), compat_dcgm=True, hostname="gpu-7", pod_resources=client))
    assert pods_of(samples, "fleetscope_gpu_utilization_ratio") == {
        "GPU-aaaa": ("serving", "vllm-0", "vllm"),
        "GPU-bbbb": NOBODY,  # time-sliced between two pods: fleetscope_gpu_pod_info names both
        "GPU-dddd": NOBODY,  # nobody's
    }
    assert pods_of(samples, "fleetscope_gpu_temperature_celsius")["GPU-cccc"] == NOBODY  # a MIG GPU is shared
    assert pods_of(samples, "fleetscope_gpu_mig_memory_used_bytes", "mig_uuid") == {
        "MIG-1111": ("batch", "mig-small", "worker"), "MIG-2222": NOBODY}
    info = sorted((labels["uuid"], labels["mig_uuid"], labels["pod"]) for n, labels, _ in samples
                  if n == "fleetscope_gpu_pod_info")
    assert info == [("GPU-aaaa", "", "vllm-0"), ("GPU-bbbb", "", "notebook-1"), ("GPU-bbbb", "", "notebook-2"),
                    ("GPU-cccc", "MIG-1111", "mig-small")]
    assert [v for n, _, v in samples if n == "fleetscope_gpu_pod_resources_up"] == ["1.0"]
    # dcgm-exporter's names and labels: per GPU, and per GPU instance on a MIG GPU
    dcgm = {(labels["UUID"], labels["GPU_I_ID"]): (labels["namespace"], labels["pod"], labels["container"])
            for n, labels, _ in samples if n == "DCGM_FI_DEV_GPU_TEMP"}
    assert dcgm == {("GPU-aaaa", ""): ("serving", "vllm-0", "vllm"), ("GPU-bbbb", ""): NOBODY,
                    ("GPU-cccc", "1"): ("batch", "mig-small", "worker"), ("GPU-cccc", "2"): NOBODY,
                    ("GPU-dddd", ""): NOBODY}
    # A process's series keep their own labels: `container` is the process's container id from its cgroup
    process = [labels for n, labels, _ in samples if n == "fleetscope_gpu_process_memory_used_bytes"]
    assert process and all("pod" not in labels and "namespace" not in labels for labels in process)


def test_without_the_kubelet_the_gpus_are_served_without_pods_and_the_agent_says_so(kubelet, client, caplog):
    source = GpuSource(backend=Backend(STATES), pod_resources=client)
    kubelet.error = grpc.StatusCode.INTERNAL
    samples = scrape(source)
    assert [v for n, _, v in samples if n == "fleetscope_gpu_pod_resources_up"] == ["0.0"]
    assert set(pods_of(samples, "fleetscope_gpu_utilization_ratio").values()) == {NOBODY}
    assert not [n for n, _, _ in samples if n == "fleetscope_gpu_pod_info"]
    assert "INTERNAL: pod resources API is not ready; GPU series carry no pod labels" in caplog.text
    kubelet.error = None
    samples = scrape(source)
    assert pods_of(samples, "fleetscope_gpu_utilization_ratio")["GPU-aaaa"] == ("serving", "vllm-0", "vllm")


def test_off_kubernetes_nothing_changes():
    samples = scrape(GpuSource(backend=Backend(STATES), compat_dcgm=True, hostname="gpu-7"))
    names = {n for n, _, _ in samples}
    assert not names & {"fleetscope_gpu_pod_info", "fleetscope_gpu_pod_resources_up"}
    assert all("pod" not in labels for n, labels, _ in samples)



@pytest.mark.parametrize("answers", [True, False], ids=["kubelet answers", "kubelet errors"])
def test_every_series_of_a_family_with_pod_labels_has_them(kubelet, client, answers):
    # The exposition caches label text by (family, labels): a series short of its family's pod labels could be
    # rendered with the text the same labels got where the family had none (the agent off Kubernetes).
    kubelet.error = None if answers else grpc.StatusCode.INTERNAL
    source = GpuSource(backend=Backend(STATES), compat_dcgm=True, hostname="gpu-7", pod_resources=client)
    families = {f.name: set(f.labels) for f in source.families}
    for r in source.collect().readings:
        names = {k for k, _ in r.labels}
        assert names <= families[r.name], r.name
        if "pod" in families[r.name]:
            assert set(kubernetes.LABELS) <= names, r.name


def test_the_agent_s_one_kubelet_client_serves_its_gpu_source_and_its_listener(kubelet, tmp_path):
    """The agent makes the PodResources client once and hands it to the GPU source and to the pods of senders,
    rather than fishing it out of a built source (a side channel that broke when the GPU source was disabled)."""
    from agent.config import AgentConfig
    from agent.main import Agent

    def agent(name, **kw):
        return Agent(AgentConfig(gpu_backend="none", pod_resources_socket=kubelet.socket_path, collector_url="",
                                 events_address=f"unix:{tmp_path}/{name}.sock", metrics_address="127.0.0.1:0", **kw))

    a = agent("a")
    try:
        (gpu,) = [s for s in a.sources if s.name == "gpu"]
        assert gpu.pod_resources is a.pod_resources is not None
        held = a._pod_assignment().held
        assert held and held == a.pod_resources.assignment().held  # the kubelet's answer
    finally:
        a.pod_resources.close()
    b = agent("b", disable_sources=["gpu"])  # no GPU source: the listener still asks the kubelet
    try:
        assert b._pod_assignment().held == held
    finally:
        b.pod_resources.close()
