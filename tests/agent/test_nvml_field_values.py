"""The sample's field values: request arrays built once per handle and filled by NVML's C function, each value
decoded by its type; one field NVML has no value for leaves only that field out."""

from __future__ import annotations

import ctypes
import struct

import pynvml
import pytest

from agent.gpu import nvml as gateway
from agent.gpu.nvml import Nvml
from tests.agent.fake_pynvml import FakeNvml, NotSupported, device


def test_the_sample_fills_arrays_built_once_per_handle_through_the_c_function():
    fake = FakeNvml([device(0)])
    nvml = Nvml(fake)
    nvml.read()
    arrays = nvml._gpus[0].field_arrays
    every, counters = arrays
    assert every and counters and all(isinstance(a, ctypes.Array) for a in every + counters)
    fake.devices[0]["energy_mj"] = 200_000_000
    fake.devices[0]["nvlink_tx_kib"][17] = 5
    (gpu,) = nvml.read()
    assert nvml._gpus[0].field_arrays is arrays  # not rebuilt
    assert gpu.energy_joules == pytest.approx(200_000.0)
    assert gpu.nvlinks[17].tx_bytes == 5 * 1024
    # the link count once; the first sample's array and the health counters' two; the second sample's array only
    assert fake.counts["nvmlDeviceGetFieldValues"] == 1 + (1 + 2) + 1


def test_one_field_without_a_value_leaves_out_that_field_only():
    fake = FakeNvml([device(0, mem_temp=NotSupported, nvlink_rx_kib={link: 1 for link in range(17)})])  # link 17: none
    (gpu,) = Nvml(fake).read()
    assert gpu.memory_temperature_celsius is None
    assert gpu.energy_joules == pytest.approx(123_456.789)
    assert gpu.nvlinks[17].rx_bytes is None and gpu.nvlinks[17].tx_bytes == 18_000 * 1024
    assert gpu.nvlinks[16].rx_bytes == 1024


def test_values_are_decoded_by_their_type_whatever_the_unused_bytes_of_the_union_hold():
    types = {pynvml.NVML_FI_DEV_MEMORY_TEMP: pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
             pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: pynvml.NVML_VALUE_TYPE_DOUBLE,
             pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER: pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG,
             pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: pynvml.NVML_VALUE_TYPE_SIGNED_INT,
             pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT}
    fake = FakeNvml([device(0, field_types=types, energy_mj=1234.5, pcie_replay=7,
                            ecc={**device(0)["ecc"], (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC): 2**31 - 1})])
    nvml = Nvml(fake)
    fill = nvml._fill_fields

    def fill_over_garbage(handle, array):
        """A driver that writes only the member's own bytes: the rest of the union keeps what it held (0xAB here)."""
        fill(handle, array)
        for i, entry in enumerate(array):
            width = {pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: 4, pynvml.NVML_VALUE_TYPE_SIGNED_INT: 4,
                     pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: 2}.get(entry.valueType)
            if width:
                ctypes.memset(ctypes.addressof(array) + i * ctypes.sizeof(entry) + 32 + width, 0xAB, 8 - width)
        return array

    nvml._fill_fields = fill_over_garbage
    (gpu,) = nvml.read()
    assert gpu.memory_temperature_celsius == 78.0
    assert gpu.energy_joules == pytest.approx(1.2345)
    assert gpu.pcie.replays == 7
    assert gpu.ecc_errors[("corrected", "volatile")] == 2**31 - 1
    assert gpu.ecc_errors[("uncorrected", "volatile")] == 0


def test_negative_signed_values_come_back_negative():
    types = {pynvml.NVML_FI_DEV_MEMORY_TEMP: pynvml.NVML_VALUE_TYPE_SIGNED_INT,
             pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG}
    (gpu,) = Nvml(FakeNvml([device(0, field_types=types, mem_temp=-5, energy_mj=-2000)])).read()
    assert gpu.memory_temperature_celsius == -5.0
    assert gpu.energy_joules == -2.0


def test_a_binding_without_the_c_function_handle_reads_through_pynvmls_wrapper():
    class OldBinding(FakeNvml):
        def __getattribute__(self, name):
            if name == "_nvmlGetFunctionPointer":
                raise AttributeError(name)
            return super().__getattribute__(name)

    old, new = Nvml(OldBinding([device(0)])), Nvml(FakeNvml([device(0)]))
    assert not old._raw_fields and new._raw_fields
    assert old.read() == new.read()
    assert old._gpus[0].field_arrays == ([], [])


def test_a_driver_without_the_function_is_a_mismatch_and_the_other_fields_stay():
    t = [0.0]
    fake = FakeNvml([device(0)])
    nvml = Nvml(fake, clock=lambda: t[0])
    nvml.read()
    fake.fail("nvmlDeviceGetFieldValues", pynvml.NVMLError_FunctionNotFound)
    t[0] = 5.0
    (gpu,) = nvml.read()
    assert gpu.up and gpu.energy_joules is None and all(link.tx_bytes is None for link in gpu.nvlinks)
    assert gpu.power_watts == 652.5 and gpu.temperature_celsius == 71.0
    assert "function_not_found" in nvml.problems
    t[0] = 30.0  # the health counters' next read finds nothing either: no link state, no link
    (gpu,) = nvml.read()
    assert gpu.up and gpu.nvlinks == () and gpu.ecc_errors == {} and gpu.power_watts == 652.5


def test_the_layout_the_decoder_reads_is_the_bindings():
    assert gateway._FIELD_VALUE.size == ctypes.sizeof(pynvml.c_nvmlFieldValue_t)
    entry = pynvml.c_nvmlFieldValue_t(fieldId=3, scopeId=4, timestamp=5, latencyUsec=6, valueType=7, nvmlReturn=8)
    entry.value.ullVal = 2**40 + 9
    assert gateway._FIELD_VALUE.unpack(bytes(entry)) == (3, 4, 5, 6, 7, 8, 2**40 + 9)
    assert struct.calcsize("=IIqqiiQ") == 40


def test_power_limits_are_read_once_a_minute_and_again_after_a_failed_read():
    t = [0.0]
    fake = FakeNvml([device(0)])
    nvml = Nvml(fake, clock=lambda: t[0])
    assert nvml.read()[0].power_limit_watts == 700.0
    fake.devices[0]["limit_mw"] = 500_000  # an administrator lowers it
    t[0] = 30.0
    assert nvml.read()[0].power_limit_watts == 700.0
    t[0] = 60.0
    assert nvml.read()[0].power_limit_watts == 500.0
    assert fake.counts["nvmlDeviceGetEnforcedPowerLimit"] == 2
    fake.fail("nvmlDeviceGetPowerManagementLimit", pynvml.NVMLError_Unknown, times=1)
    t[0] = 120.0
    gpu = nvml.read()[0]
    assert gpu.power_limit_watts == 500.0 and gpu.power_management_limit_watts is None
    t[0] = 125.0  # not a minute later: the failed read is tried again at once
    assert nvml.read()[0].power_management_limit_watts == 700.0


# -- what is read at every sample, and what every COUNTERS_REFRESH_S ------------------------------------------------
def test_health_counters_and_fabric_are_read_every_30_s_and_the_rest_at_every_sample():
    t = [0.0]
    fake = FakeNvml([device(0)])
    nvml = Nvml(fake, clock=lambda: t[0])
    (gpu,) = nvml.read()
    assert gpu.ecc_errors[("uncorrected", "volatile")] == 0 and gpu.nvlinks[5].up and gpu.fabric.state == "completed"
    d = fake.devices[0]
    d["ecc"] = {**d["ecc"], (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC): 3}
    d["nvlink_errors"] = {(2, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT): 9}
    d["nvlinks"] = [link != 5 for link in range(18)]
    d["fabric"] = (pynvml.NVML_GPU_FABRIC_STATE_IN_PROGRESS, 0, 0, 0, 0)
    d["energy_mj"] = 300_000_000
    d["nvlink_tx_kib"][3] = 11
    calls = fake.counts["nvmlDeviceGetFieldValues"]
    for now in (5.0, 29.9):
        t[0] = now
        (gpu,) = nvml.read()
        assert gpu.energy_joules == pytest.approx(300_000.0) and gpu.nvlinks[3].tx_bytes == 11 * 1024  # at once
        assert gpu.ecc_errors[("uncorrected", "volatile")] == 0 and gpu.nvlinks[2].crc_flit_errors == 0  # not yet
        assert gpu.nvlinks[5].up and gpu.fabric.state == "completed"
    assert fake.counts["nvmlDeviceGetFieldValues"] - calls == 2  # one array a sample: the counters' two not asked
    t[0] = 30.0
    (gpu,) = nvml.read()
    assert gpu.ecc_errors[("uncorrected", "volatile")] == 3 and gpu.nvlinks[2].crc_flit_errors == 9
    assert not gpu.nvlinks[5].up and gpu.nvlinks[4].up and gpu.fabric.state == "in_progress"
    assert gpu.energy_joules == pytest.approx(300_000.0) and gpu.nvlinks[5].tx_bytes > 0  # a down link still counts
    assert fake.counts["nvmlDeviceGetFieldValues"] - calls == 2 + 3


def test_a_failed_read_of_the_health_counters_is_tried_again_at_the_next_sample():
    t = [0.0]
    fake = FakeNvml([device(0)])
    nvml = Nvml(fake, clock=lambda: t[0])
    nvml.read()
    fake.fail("nvmlDeviceGetGpuFabricInfoV", pynvml.NVMLError_Unknown, times=1)
    fake.devices[0]["pcie_replay"] = 40
    t[0] = 30.0
    (gpu,) = nvml.read()
    assert gpu.up and gpu.fabric is None and gpu.pcie.replays == 40
    t[0] = 35.0  # not 30 s later: at once
    (gpu,) = nvml.read()
    assert gpu.fabric.state == "completed"
    assert fake.counts["nvmlDeviceGetGpuFabricInfoV"] == 3
    t[0] = 40.0  # read, so due again 30 s after 35
    nvml.read()
    assert fake.counts["nvmlDeviceGetGpuFabricInfoV"] == 3
