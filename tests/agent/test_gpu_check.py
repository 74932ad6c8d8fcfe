"""bench/gpu_check.sh, the one script run on a lent GPU machine, dry-run here on the tests' fake NVML.

The NVML call counter (bench/gpu_check_nvml.py) against the fake's own count of every call, and against a
module shaped like pynvml (its functions reach the C library through _nvmlGetFunctionPointer). The whole
script (slow: about 15 s a run) with a fake nvidia-smi, the fake NVML as pynvml and msgspec hidden, as on the
device: msgspec installed from the carried wheels, promtool from the carried promtool.xz, one archive
and the report in $OUT; a missing promtool fails as NOT LINTED; an agent that dies after answering fails
at the next fetch, with its log's end in the report; no wheel carried for a missing module: status 2.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import lzma
import os
import subprocess
import sys
import sysconfig
import tarfile
import types
import zipfile
from pathlib import Path

import pytest

from agent.gpu.nvml import Nvml
from bench.gpu_check_nvml import CallCounter, SampleClock, measure, report
from tests.agent import fake_pynvml
from tests.agent.fake_pynvml import FakeNvml, device

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


# -- the call counter ---------------------------------------------------------------------------------
def test_counter_counts_every_call_the_fake_answers_field_value_batches_included():
    """The fake counts each call it answers, the C field-value function the gateway calls directly too: the
    counter agrees call for call (counting pynvml's nvml* functions alone missed the field-value batches)."""
    fake = FakeNvml([device(0), device(1)])
    counter = CallCounter(fake)
    counter.install()
    clock = SampleClock()
    nvml = Nvml(fake, clock=clock)
    try:
        for _ in range(3):
            clock.tick()
            nvml.read()
        counter.clear()
        before = fake.counts.copy()
        for _ in range(6):  # 30 s of samples
            clock.tick()
            nvml.read()
        truth = fake.counts - before
        counts, _, c_level = counter.snapshot()
    finally:
        nvml.shutdown()
        counter.uninstall()
    # per GPU: one batch a sample, and the health counters' two batches once in those 30 s
    assert counts["nvmlDeviceGetFieldValues"] == 2 * (6 + 2)
    assert counts == truth
    assert c_level == truth["nvmlDeviceGetFieldValues"]  # the only calls that reached a C function


def test_measure_leaves_the_frees_at_shutdown_out_of_the_per_sample_counts():
    fake = FakeNvml([device(0), device(1)])
    own = fake.nvmlDeviceGetCount, fake._nvmlGetFunctionPointer
    result = measure(fake, samples=24)
    assert result["gpus"] == 2
    assert "nvmlShutdown" not in result["counts"] and "nvmlGpmSampleFree" not in result["counts"]
    assert result["shutdown"]["nvmlShutdown"] == 1 and result["shutdown"]["nvmlGpmSampleFree"] > 0
    # per GPU, 24 samples 5 s apart: one batch a sample, and the health counters' two at 4 of them (every 30 s)
    assert any("nvmlDeviceGetFieldValues 1.33333" in line for line in report(result))
    assert (fake.nvmlDeviceGetCount, fake._nvmlGetFunctionPointer) == own  # the fake's own functions again


def _pynvml_shaped() -> types.ModuleType:
    """A module whose nvml* functions reach their C functions as pynvml's do (a module-global lookup)."""
    lib = types.ModuleType("pynvml_shaped")
    calls = []

    class CFunction:
        def __init__(self, name):
            self.name, self.restype = name, int

        def __call__(self, *args):
            calls.append(self.name)
            return 0

    cache: dict[str, CFunction] = {}
    source = '''
def _nvmlGetFunctionPointer(name):
    if name == "nvmlMissing":
        raise LookupError("function not found")
    if name not in cache:
        cache[name] = CFunction(name)
    return cache[name]

def nvmlDeviceGetCount():
    return _nvmlGetFunctionPointer("nvmlDeviceGetCount")()

def nvmlDeviceGetProcesses(handle):  # asks for the size, then for the list: two C calls
    fn = _nvmlGetFunctionPointer("nvmlDeviceGetProcesses_v3")
    fn(handle)
    return fn(handle)

def nvmlDeviceGetProcessesOuter(handle):  # a wrapper calling another wrapper
    return nvmlDeviceGetProcesses(handle)

def nvmlErrorString(code):
    fn = _nvmlGetFunctionPointer("nvmlErrorString")
    fn.restype = str  # pynvml sets restype on the function it was handed
    return fn(code)

def nvmlMissing():
    return _nvmlGetFunctionPointer("nvmlMissing")()

def nvmlPythonOnly():
    return 7
'''
    lib.__dict__.update(cache=cache, CFunction=CFunction)
    exec(source, lib.__dict__)
    lib.c_calls = calls
    return lib


def test_counter_counts_c_calls_once_each_through_the_function_pointer():
    lib = _pynvml_shaped()
    counter = CallCounter(lib)
    counter.install()
    lib.nvmlDeviceGetCount()
    lib.nvmlDeviceGetProcessesOuter(0)
    lib.nvmlErrorString(1)
    with pytest.raises(LookupError):
        lib.nvmlMissing()
    lib.nvmlPythonOnly()
    lib._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")(0, 1, 2)  # the gateway's direct call
    counter.uninstall()
    assert lib.cache["nvmlErrorString"].restype is str  # set through the counted function onto the real one
    assert counter.counts == {"nvmlDeviceGetCount": 1, "nvmlDeviceGetProcesses_v3": 2, "nvmlErrorString": 1,
                              "nvmlPythonOnly": 1, "nvmlDeviceGetFieldValues": 1}
    assert sum(counter.counts.values()) - counter.c_level == 1  # nvmlPythonOnly; the failed lookup made no call
    assert len(lib.c_calls) == counter.c_level == 5


# -- the whole script, dry-run --------------------------------------------------------------------------
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *index,uuid,power.draw*) printf '0, GPU-fake-0, 652.50, 61440, 1980, 2619, 71\\n1, GPU-fake-1, 652.50, 61440, 1980, 2619, 71\\n';;
  *--query-gpu=driver_version*) echo 570.124.06; echo 570.124.06;;
  *--query-gpu=index,memory.reserved*) printf '0, 1024 MiB, 81920 MiB\\n1, 1024 MiB, 81920 MiB\\n';;
  *--query-gpu=index*) printf '0\\n1\\n';;
  -q) echo "fake -q";;
  *) echo "fake nvidia-smi table";;
esac
"""

# The fake NVML as the module pynvml, with the real pynvml (that the fake builds on) loaded from its file.
# FAKE_EXIT_AT_READ=N: the agent (not the in-process measurement) exits at its Nth read of the GPUs.
SHIM = """import importlib.util, os, sys
_spec = importlib.util.spec_from_file_location("pynvml", {real!r})
_real = importlib.util.module_from_spec(_spec)
sys.modules["pynvml"] = _real
_spec.loader.exec_module(_real)
from tests.agent.fake_pynvml import FakeNvml, device
_fake = FakeNvml([device(0), device(1)])
if os.environ.get("FAKE_EXIT_AT_READ") and sys.argv[1:2] == ["agent"]:
    _count, _reads = _fake.nvmlDeviceGetCount, [0]
    def _exiting(*args):
        _reads[0] += 1
        if _reads[0] >= int(os.environ["FAKE_EXIT_AT_READ"]):
            os._exit(3)
        return _count(*args)
    _fake.nvmlDeviceGetCount = _exiting
sys.modules["pynvml"] = _fake
"""

# promtool: the real one where installed, else one that accepts any non-empty exposition
FAKE_PROMTOOL = b"""#!/bin/sh
if command -v promtool >/dev/null 2>&1; then exec promtool "$@"; fi
case "$1" in
  --version) echo "promtool, fake";;
  check) [ -n "$(cat)" ];;
esac
"""


def _wheel_of_installed(name: str, dest: Path) -> Path:
    """A wheel of the installed distribution `name`, for this interpreter, from its installed files."""
    dist = importlib.metadata.distribution(name)
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    path = dest / f"{dist.metadata['Name']}-{dist.version}-{tag}-{tag}-{platform}.whl"
    records = []
    with zipfile.ZipFile(path, "w") as whl:
        record_name = None
        for file in dist.files or ():
            parts = Path(str(file)).parts
            if "__pycache__" in parts or parts[0].startswith("..") or parts[-1] in ("INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            if parts[-1] == "RECORD":
                record_name = str(file)
                continue
            whl.write(file.locate(), str(file))
            records.append(f"{file},,")
        assert record_name, "the installed distribution has no RECORD"
        whl.writestr(record_name, "\n".join(records + [f"{record_name},,"]) + "\n")
    return path


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """A machine as the device looks to the script: fake nvidia-smi, fake NVML, msgspec missing."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this python: the script installs the carried wheels with it")
    base = tmp_path_factory.mktemp("gpu_check")
    (base / "bin").mkdir()
    smi = base / "bin" / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    (base / "shim").mkdir()
    real = fake_pynvml.real.__file__  # the real pynvml, whatever sys.modules holds now
    (base / "shim" / "pynvml.py").write_text(SHIM.format(real=real))
    (base / "block" / "msgspec").mkdir(parents=True)
    (base / "block" / "msgspec" / "__init__.py").write_text('raise ImportError("msgspec hidden: the device has none")\n')
    carried = base / "carried"
    (carried / "wheels").mkdir(parents=True)
    _wheel_of_installed("msgspec", carried / "wheels")
    (carried / "promtool.xz").write_bytes(lzma.compress(FAKE_PROMTOOL, format=lzma.FORMAT_XZ))
    return base


def _run(dry: Path, name: str, **env: str) -> tuple[int, str, Path]:
    out = dry / name
    environ = dict(os.environ)
    environ.update({
        "PATH": f"{dry / 'bin'}:{environ.get('PATH', '')}",
        "PYTHONPATH": f"{dry / 'shim'}:{dry / 'block'}",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "GPU_CHECK_DEVICE_DIR": str(dry / "carried"),
        "GPU_CHECK_AGENT_S": "3", "GPU_CHECK_DCGM_S": "2", "GPU_CHECK_SAMPLES": "5",
    })
    environ.update(env)
    proc = subprocess.run(["bash", str(SCRIPT)], env=environ, cwd=dry, capture_output=True, text=True, timeout=240)
    report_text = (out / "report.txt").read_text()
    assert proc.stdout == report_text  # what the device tool's output tail shows is the report
    return proc.returncode, report_text, out


@pytest.mark.slow
def test_dry_run_passes_with_the_carried_wheels_and_promtool_and_returns_two_files(dry):
    # The agent runs 1 s before its three rounds rather than 3 s: the fake NVML's values do not change, and a
    # value passes when one round agrees. (The agent that dies below keeps 3 s: it must be dead by round 1.)
    status, text, out = _run(dry, "pass", GPU_CHECK_AGENT_S="1")
    assert status == 0, text
    assert "installing msgspec from" in text and "/site/msgspec/__init__.py" in text
    assert "/bin/promtool (" in text  # the carried promtool.xz, decompressed
    assert "PASS  promtool check metrics metrics.prom" in text
    assert "PASS  values against nvidia-smi" in text
    # the gateway's field-value batches are counted: one a sample, and at one of the 5 samples (5 s apart on the
    # reader's clock, after 3 warm-up reads) the health counters' two
    assert "nvmlDeviceGetFieldValues 1.4" in text
    assert "at shutdown (not per sample): " in text
    assert "-- the end of agent.log" in text and "-- the end of agent-dcgm.log" in text
    assert "RESULT: every check passed" in text.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "report.txt"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"agent.log", "agent-dcgm.log", "metrics.prom", "metrics-dcgm.prom", "nvidia-smi.txt", "report.txt",
            "rounds/metrics-1.prom", "rounds/nvidia-smi-3.csv"} <= names
    assert not any(n.startswith(("site", "bin")) for n in names)  # the tools stay out of the archive


@pytest.mark.slow
def test_dry_run_without_promtool_fails_the_lint_checks_as_not_linted(dry):
    status, text, _ = _run(dry, "no-promtool", GPU_CHECK_PROMTOOL=str(dry / "absent" / "promtool"), GPU_CHECK_AGENT_S="1")
    assert status == 1, text
    assert "FAIL  promtool check metrics metrics.prom: NOT LINTED" in text
    assert "FAIL  promtool check metrics metrics-dcgm.prom: NOT LINTED" in text
    assert "PASS  promtool" not in text
    assert "RESULT: 2 check(s) FAILED" in text


@pytest.mark.slow
def test_dry_run_agent_that_dies_after_answering_fails_at_the_fetch_with_its_log(dry):
    status, text, _ = _run(dry, "dies", FAKE_EXIT_AT_READ="3", GPU_CHECK_DCGM_S="4")
    assert status == 1, text
    assert "FAIL  the agent is running at the fetch of metrics-1.prom (it exited with status 3" in text
    assert "FAIL  the agent is running at the fetch of metrics-dcgm.prom (it exited with status 3" in text
    assert "-- the end of agent.log" in text
    assert "PASS  promtool check metrics" not in text  # nothing empty was linted as a pass
    assert "PASS  in-process NVML sampling" in text  # the in-process reader does not exit


@pytest.mark.slow
def test_dry_run_with_a_module_missing_and_no_wheels_carried_cannot_run(dry, tmp_path):
    status, text, _ = _run(dry, "no-wheels", GPU_CHECK_DEVICE_DIR=str(tmp_path / "nothing"))
    assert status == 2, text
    assert "no wheels carried" in text and "still missing" in text
    assert "RESULT: could not run the checks" in text
