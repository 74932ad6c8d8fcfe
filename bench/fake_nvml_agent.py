"""Run `fleetscope agent` on the tests' fake NVML, so its NVML path runs on a machine without GPUs.

    python -m bench.fake_nvml_agent [--fake-gpus 8] [--no-gpm] agent --gpu-backend nvml --metrics-address ...

Everything after the two options is the normal `fleetscope` command line. The fake
(tests/agent/fake_pynvml.py) answers every call from a Python dict, so a sample costs the agent's
own work per NVML call plus the fake's bookkeeping, not the driver's: on a real GPU each call is
an ioctl into the kernel driver (bench/gpu_check.sh times them on real hardware). `--no-gpm`
gives the fake GPUs no GPU performance monitoring, as NVML answers on a pre-Hopper GPU.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    gpus, gpm = 8, True
    while argv[:1] in (["--fake-gpus"], ["--no-gpm"]):
        if argv[0] == "--no-gpm":
            gpm, argv = False, argv[1:]
        else:
            gpus, argv = int(argv[1]), argv[2:]
    # agent/gpu/nvml.py imports pynvml inside Nvml.__init__, so the fake must be in place before that.
    from tests.agent.fake_pynvml import FakeNvml, NotSupported, device

    overrides = {} if gpm else {"gpm": NotSupported}
    sys.modules["pynvml"] = FakeNvml([device(i, **overrides) for i in range(gpus)])  # type: ignore[assignment]
    from fleetscope.cli import main as fleetscope_main

    return fleetscope_main(argv)


if __name__ == "__main__":
    sys.exit(main())
