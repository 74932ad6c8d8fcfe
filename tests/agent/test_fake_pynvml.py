"""The fake NVML must not be kinder than the real binding: every function it offers exists in the
real `pynvml` (nvidia-ml-py) with a signature the gateway's calls also fit."""

from __future__ import annotations

import ctypes
import inspect
import re

import pynvml
import pytest

from agent.gpu import nvml as gateway
from tests.agent.fake_pynvml import FakeNvml, device

FAKE_FUNCTIONS = sorted(name for name in dir(FakeNvml) if name.startswith("nvml"))


def _arity(func) -> tuple[int, int]:
    """(required, total) positional parameters."""
    params = [p for p in inspect.signature(func).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return sum(p.default is p.empty for p in params), len(params)


@pytest.mark.parametrize("name", FAKE_FUNCTIONS)
def test_every_fake_function_exists_in_the_real_binding_with_the_same_arity(name):
    real = getattr(pynvml, name, None)
    assert real is not None, f"{name} is not a pynvml function"
    fake_required, fake_total = _arity(getattr(FakeNvml, name))
    real_required, real_total = _arity(real)
    # The fake's methods take self first.
    assert (fake_required - 1, fake_total - 1) == (real_required, real_total), (name, inspect.signature(real))


def test_every_nvml_function_the_gateway_calls_is_in_the_fake_and_the_real_binding():
    source = inspect.getsource(gateway)

    called = set(re.findall(r"\b(nvml[A-Z][A-Za-z0-9_]+)\b", source)) - {"nvmlReturn"}  # a struct field, not a call
    called = {n for n in called if not n.startswith(("nvmlEventType", "nvmlMemory_v"))}  # constants
    missing_real = sorted(n for n in called if not hasattr(pynvml, n))
    missing_fake = sorted(n for n in called if n not in FAKE_FUNCTIONS)
    assert not missing_real, missing_real
    assert not missing_fake, missing_fake


def test_the_fake_refuses_calls_before_init_and_after_shutdown():
    fake = FakeNvml([device(0)])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    assert fake.nvmlDeviceGetCount() == 1
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetHandleByIndex(0)


def test_the_fake_injects_any_error_per_call_and_per_gpu():
    fake = FakeNvml([device(0), device(1)])
    fake.nvmlInit()
    fake.fail("nvmlDeviceGetPowerUsage", pynvml.NVMLError_Unknown, gpu=1, times=1)
    assert fake.nvmlDeviceGetPowerUsage(0) == 652_500
    with pytest.raises(pynvml.NVMLError_Unknown):
        fake.nvmlDeviceGetPowerUsage(1)
    assert fake.nvmlDeviceGetPowerUsage(1) == 652_500  # once only
    fake.devices[0]["lost"] = True
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetHandleByIndex(0)
    event_set = fake.nvmlEventSetCreate()
    fake.nvmlDeviceRegisterEvents(1, pynvml.nvmlEventTypeXidCriticalError, event_set)
    fake.devices[1]["error"] = pynvml.NVMLError_ResetRequired
    with pytest.raises(pynvml.NVMLError_ResetRequired):
        fake.nvmlEventSetWait_v2(event_set, 0)  # a broken GPU's events fail too
    fake.fail("nvmlDeviceGetUUID", pynvml.NVMLLibraryMismatchError("mismatch"))
    with pytest.raises(pynvml.NVMLLibraryMismatchError):
        fake.nvmlDeviceGetUUID(0)
    assert fake.counts["nvmlDeviceGetPowerUsage"] == 3


def test_the_c_function_handle_is_pynvmls_and_answers_as_c_does():
    """The gateway fills its field-value arrays through pynvml's _nvmlGetFunctionPointer: the fake offers it with
    the real signature, counts and faults its calls as nvmlDeviceGetFieldValues, and returns codes, not errors."""
    assert _arity(FakeNvml._nvmlGetFunctionPointer) == tuple(n + 1 for n in _arity(pynvml._nvmlGetFunctionPointer))
    fake = FakeNvml([device(0)])
    fake.nvmlInit()
    fn = fake._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")
    values = (pynvml.c_nvmlFieldValue_t * 2)()
    values[0].fieldId, values[1].fieldId = pynvml.NVML_FI_DEV_MEMORY_TEMP, pynvml.NVML_FI_DEV_RETIRED_SBE
    assert fn(0, ctypes.c_int32(2), ctypes.byref(values)) == pynvml.NVML_SUCCESS
    assert values[0].nvmlReturn == pynvml.NVML_SUCCESS and values[0].value.ullVal == 78
    assert values[1].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED  # Hopper remaps rows instead
    fake.fail("nvmlDeviceGetFieldValues", pynvml.NVMLError_Unknown, gpu=0, times=1)
    assert fn(0, ctypes.c_int32(2), ctypes.byref(values)) == pynvml.NVML_ERROR_UNKNOWN
    assert fake.counts["nvmlDeviceGetFieldValues"] == 2
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        fake._nvmlGetFunctionPointer("nvmlDeviceGetSomethingNew")
    fake.nvmlShutdown()
    assert fn(0, ctypes.c_int32(2), ctypes.byref(values)) == pynvml.NVML_ERROR_UNINITIALIZED


def test_the_fake_plays_an_older_driver_per_gpu():
    """`lacks`: FunctionNotFound before anything else (pynvml looks the symbol up first); `fields_unsupported`:
    NOT_SUPPORTED in the batch for those ids only; `fabric_versions`: the structs FabricInfoV takes."""
    fake = FakeNvml([device(0), device(1, lacks=frozenset({"nvmlDeviceGetGpuFabricInfoV"}), lost=True,
                                        fields_unsupported=frozenset({pynvml.NVML_FI_DEV_NVLINK_GET_STATE}),
                                        fabric_versions=(pynvml.nvmlGpuFabricInfo_v2,))])
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        fake.nvmlDeviceGetGpuFabricInfoV(1, ctypes.byref(pynvml.c_nvmlGpuFabricInfo_v2_t()))  # lost, but lacking first
    fake.devices[1]["lost"] = False
    fake.devices[1]["lacks"] = frozenset()
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        fake.nvmlDeviceGetGpuFabricInfoV(1, ctypes.byref(pynvml.c_nvmlGpuFabricInfo_v3_t()))
    info = pynvml.c_nvmlGpuFabricInfo_v2_t()
    assert fake.nvmlDeviceGetGpuFabricInfoV(1, ctypes.byref(info)) == pynvml.NVML_SUCCESS and info.cliqueId == 7
    old = pynvml.c_nvmlGpuFabricInfo_t()
    assert fake.nvmlDeviceGetGpuFabricInfo(0, ctypes.byref(old)) == pynvml.NVML_SUCCESS
    assert old.state == pynvml.NVML_GPU_FABRIC_STATE_COMPLETED
    ids = [(pynvml.NVML_FI_DEV_NVLINK_GET_STATE, 0), (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, 0)]
    got = fake.nvmlDeviceGetFieldValues(1, ids)
    assert [v.nvmlReturn for v in got] == [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_SUCCESS]
    assert [v.nvmlReturn for v in fake.nvmlDeviceGetFieldValues(0, ids)] == [pynvml.NVML_SUCCESS] * 2
    assert fake.nvmlDeviceGetCurrentClocksThrottleReasons(0) == fake.nvmlDeviceGetCurrentClocksEventReasons(0)
    sample = fake.nvmlGpmSampleAlloc()
    fake.nvmlGpmSampleFree(sample)
    assert (fake.gpm_allocs, fake.gpm_frees) == (1, 1)
