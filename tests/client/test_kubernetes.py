"""In a Kubernetes pod the client names its pod and namespace on every event (fleetscope.schema.PodIds)."""

from __future__ import annotations

import json

import fleetscope
from fleetscope import client
from fleetscope.client import Emitter, pod_ids
from fleetscope.schema import PodIds, decode_event

POD_ENV = ("POD_NAME", "POD_NAMESPACE", "KUBERNETES_SERVICE_HOST", "HOSTNAME")


def test_every_event_of_a_pod_with_the_downward_api_carries_its_pod(udp, monkeypatch):
    monkeypatch.setenv("POD_NAME", "llama-worker-3")
    monkeypatch.setenv("POD_NAMESPACE", "training")
    emitter = Emitter(udp.getsockname())
    run = fleetscope.training(job="llama", rank=0, world_size=1, emitter=emitter)
    with run.step(tokens=8):
        pass
    with run.step(tokens=8):  # the hand-written datagram (after the first step's prefix is cached)
        pass
    with run.pause("checkpoint"):
        pass
    svc = fleetscope.inference("chat", model="m", emitter=emitter)
    with svc.request() as r:
        r.finish(output_tokens=2)
    events = [decode_event(udp.recv(65536)) for _ in range(5)]
    assert [e.pod for e in events] == [PodIds("training", "llama-worker-3")] * 5  # never verified by the client


def test_without_the_downward_api_the_service_account_namespace_and_the_hostname_stand_in(tmp_path, monkeypatch):
    namespace = tmp_path / "namespace"
    namespace.write_text("serving\n")
    monkeypatch.setattr(client, "SERVICE_ACCOUNT_NAMESPACE", str(namespace))
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": "vllm-0"}
    assert pod_ids(env) == {"namespace": "serving", "pod": "vllm-0"}
    assert pod_ids({**env, "POD_NAME": "vllm-0-long-name"}) == {"namespace": "serving", "pod": "vllm-0-long-name"}
    assert pod_ids({"HOSTNAME": "vllm-0"}) is None  # a namespace file but no sign of a pod: not named
    namespace.unlink()
    assert pod_ids(env) is None  # no service account and no POD_NAMESPACE: the namespace is not known
    assert pod_ids({**env, "POD_NAMESPACE": "serving"}) == {"namespace": "serving", "pod": "vllm-0"}
    assert pod_ids({"POD_NAMESPACE": "a\nb", "POD_NAME": "p"}) is None  # what the agent would refuse


def test_outside_kubernetes_no_pod_field(udp, monkeypatch, tmp_path):
    for key in POD_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(client, "SERVICE_ACCOUNT_NAMESPACE", str(tmp_path / "none"))
    run = fleetscope.training(job="j", emitter=Emitter(udp.getsockname()))
    with run.step():
        pass
    assert "pod" not in json.loads(udp.recv(65536))
