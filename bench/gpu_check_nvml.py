"""NVML calls and time per sample of agent.gpu.nvml.Nvml().read(), in-process (step 4 of bench/gpu_check.sh).

    python -m bench.gpu_check_nvml [--samples 20] [--warmup 3]

Counts what reaches NVML's C library: every call of a function that pynvml's `_nvmlGetFunctionPointer` hands
out, whoever asked for it (pynvml's own wrappers, and the gateway's field-value batches, which call the C
function directly: agent/gpu/nvml.py `_fill_fields`). A pynvml function (`nvml*`) that ran without asking for
a C function (a binding that answers from Python, as the tests' fake does) counts once as itself, so the
two levels never count the same call twice. Only the calls made by the thread that reads count per sample;
another thread's (the PCIe reader's) are shown apart. The counts are taken before Nvml.shutdown(), whose
frees are shown apart too. Exit status 1 when no GPU was read.

The reads follow one another at once, but the gateway's own clock (what it schedules by: power limits once a
minute, the health counters every 30 s, MIG re-listing) moves on by the agent's default interval at each read,
so the counts are those of a running agent's samples, the slower reads included in their share.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import types
from collections import Counter
from typing import Any

from agent.config import AgentConfig

SAMPLE_INTERVAL_S = AgentConfig.interval_s  # the agent's default: the gateway's clock moves this much per read

# pynvml's helpers that make no NVML call of their own
HELPERS = frozenset({"nvmlStructToFriendlyObject", "nvmlFriendlyObjectToStruct", "nvmlExceptionClass"})


class _CountedFunction:
    """A C function from _nvmlGetFunctionPointer that counts its calls; attributes (restype...) go to it."""

    __slots__ = ("_fn", "_name", "_counter")

    def __init__(self, fn: Any, name: str, counter: CallCounter) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_counter", counter)

    def __call__(self, *args: Any) -> Any:
        self._counter._count(self._name, c_level=True)
        return self._fn(*args)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._fn, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._fn, attr, value)


class CallCounter:
    """Counts the NVML calls made through `lib` (pynvml, or anything shaped like it) once install() has run."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.reader = threading.get_ident()  # the thread whose calls count per sample
        self.counts: Counter[str] = Counter()  # the reader's calls
        self.other_threads: Counter[str] = Counter()
        self.c_level = 0  # of the reader's calls, how many were counted at the C function
        self._state = threading.local()
        self._saved: dict[str, Any] = {}

    def clear(self) -> None:
        self.counts.clear()
        self.other_threads.clear()
        self.c_level = 0

    def snapshot(self) -> tuple[Counter[str], Counter[str], int]:
        return self.counts.copy(), self.other_threads.copy(), self.c_level

    def _count(self, name: str, *, c_level: bool) -> None:
        if threading.get_ident() == self.reader:
            self.counts[name] += 1
            self.c_level += c_level
        else:
            self.other_threads[name] += 1

    def install(self) -> None:
        lib = self.lib
        for name in dir(lib):
            value = getattr(lib, name)
            if name.startswith("nvml") and name not in HELPERS and isinstance(value, types.FunctionType):
                self._saved[name] = value
                setattr(lib, name, self._python_level(name, value))
        lookup = getattr(lib, "_nvmlGetFunctionPointer", None)
        if callable(lookup):
            self._saved["_nvmlGetFunctionPointer"] = lookup
            setattr(lib, "_nvmlGetFunctionPointer", self._c_level(lookup))

    def uninstall(self) -> None:
        for name, value in self._saved.items():
            setattr(self.lib, name, value)
        self._saved.clear()

    def _python_level(self, name: str, func: Any) -> Any:
        state = self._state

        def call(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(state, "depth", 0)
            if depth == 0:
                state.reached_c = False
            state.depth = depth + 1
            try:
                return func(*args, **kwargs)
            finally:
                state.depth = depth
                if depth == 0 and not state.reached_c:  # counted here only when no C function was asked for
                    self._count(name, c_level=False)

        call.__name__ = call.__qualname__ = name
        call.__wrapped__ = func
        return call

    def _c_level(self, lookup: Any) -> Any:
        state = self._state
        handed: dict[str, tuple[Any, _CountedFunction]] = {}

        def get_function_pointer(name: str) -> Any:
            state.reached_c = True  # even when the lookup fails: then no call was made, and none counts
            fn = lookup(name)
            known = handed.get(name)
            if known is None or known[0] is not fn:
                known = handed[name] = (fn, _CountedFunction(fn, name, self))
            return known[1]

        return get_function_pointer


class SampleClock:
    """A monotonic clock for the gateway that moves on by `interval_s` at each tick(): back-to-back reads scheduled
    as the agent's samples are."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s, self.now = interval_s, time.monotonic()

    def tick(self) -> None:
        self.now += self.interval_s

    def __call__(self) -> float:
        return self.now


def measure(lib: Any, *, samples: int = 24, warmup: int = 3, nvml_factory: Any = None) -> dict[str, Any]:
    """Reads the GPUs `warmup` times, then `samples` times counted and timed, on a SampleClock (24 samples: four
    reads of the health counters, one in six); the counts are taken before shutdown. `lib` must be the module the
    reader uses (pynvml); `nvml_factory(lib, clock)` builds the reader (default: Nvml)."""
    counter = CallCounter(lib)
    counter.install()
    clock = SampleClock()
    try:
        if nvml_factory is None:
            from agent.gpu.nvml import Nvml

            nvml = Nvml(lib, clock=clock)
        else:
            nvml = nvml_factory(lib, clock)
        t = time.perf_counter()
        states = nvml.read()
        first_ms = (time.perf_counter() - t) * 1000
        for _ in range(max(warmup - 1, 0)):
            clock.tick()
            nvml.read()
        counter.clear()
        times = []
        for _ in range(samples):
            clock.tick()
            t = time.perf_counter()
            nvml.read()
            times.append(time.perf_counter() - t)
        counts, other, c_level = counter.snapshot()  # before shutdown: its frees are no sample's calls
        counter.clear()
        nvml.shutdown()
        at_shutdown = counter.snapshot()[0]
    finally:
        counter.uninstall()
    return {"gpus": len(states), "first_ms": first_ms, "samples": samples, "times": times, "counts": counts,
            "c_level": c_level, "other_threads": other, "shutdown": at_shutdown}


def report(result: dict[str, Any]) -> list[str]:
    gpus, samples, counts, times = result["gpus"], result["samples"], result["counts"], result["times"]
    lines = [f"first read (initialises NVML): {result['first_ms']:.1f} ms, {gpus} GPUs"]
    if not gpus:
        return lines + ["the agent read no GPUs"]
    calls = sum(counts.values())
    per = samples * gpus
    median = statistics.median(times)
    lines.append(f"{calls / per:.1f} NVML calls per GPU per sample ({gpus} GPUs, {samples} samples); "
                 f"{median * 1000:.2f} ms per sample median, {max(times) * 1000:.2f} max; "
                 f"{median / max(calls / samples, 1) * 1e6:.1f} us per call on average")
    lines.append(f"counted at the C function (_nvmlGetFunctionPointer): {result['c_level']} of {calls}; "
                 f"at pynvml's Python functions that reached no C function: {calls - result['c_level']}")
    lines.append("calls per GPU per sample: " + ", ".join(f"{n} {c / per:g}" for n, c in counts.most_common()))
    if result["other_threads"]:
        lines.append("other threads, over the same samples (not per sample): "
                     + ", ".join(f"{n} {c}" for n, c in result["other_threads"].most_common()))
    lines.append("at shutdown (not per sample): "
                 + (", ".join(f"{n} {c}" for n, c in result["shutdown"].most_common()) or "none"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    import pynvml

    result = measure(pynvml, samples=args.samples, warmup=args.warmup)
    print("\n".join(report(result)), flush=True)
    return 0 if result["gpus"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
