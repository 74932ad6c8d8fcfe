#!/usr/bin/env bash
# Checks the agent's NVML backend on a real NVIDIA machine, in about a minute; never waits unbounded.
#
#   bash bench/gpu_check.sh            # from the repository root; report in ${OUT:-./gpu_check_out}
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# 1. nvidia-smi and the driver version (nvidia-smi.txt);
# 2. the agent (--gpu-backend nvml, 1 s samples) for ~20 s; /metrics (metrics.prom) linted by promtool;
# 3. power, memory used, SM and memory clocks and temperature per GPU against nvidia-smi, in the
#    agent's units (W, bytes, Hz, C) against nvidia-smi's (W, MiB, MHz, C); three rounds, a value
#    passes when one round agrees (the two read at slightly different moments; a unit or scale
#    error never agrees);
# 4. in-process: NVML calls per GPU per sample and time per sample of agent.gpu.nvml.Nvml().read();
# 5. the agent with --compat dcgm: a few DCGM_FI_DEV_* series present, one per GPU.
# Exit status: 0 when every check passed, 1 when one failed, 2 when the machine cannot run them
# (no driver, no pynvml, no python); report.txt says which.

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/report.txt"
: > "$REPORT"
FAILS=0
AGENT_PID=""

say() { printf '%s\n' "$*" | tee -a "$REPORT"; }
# Runs a command with its output in the report; returns its status.
logged() { "$@" 2>&1 | tee -a "$REPORT"; return "${PIPESTATUS[0]}"; }
pass() { say "PASS  $*"; }
fail() { say "FAIL  $*"; FAILS=$((FAILS + 1)); }
finish() {
    stop_agent
    say ""
    if [ "$1" -eq 2 ]; then
        say "RESULT: could not run the checks (see above); report in $REPORT"
    elif [ "$FAILS" -gt 0 ]; then
        say "RESULT: $FAILS check(s) FAILED; report in $REPORT"
    else
        say "RESULT: every check passed; report in $REPORT"
    fi
    exit "$1"
}
stop_agent() {
    if [ -n "$AGENT_PID" ]; then
        kill "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
        AGENT_PID=""
    fi
}
trap 'stop_agent' EXIT
trap 'say "interrupted"; finish 2' INT TERM

say "fleetscope gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $(nproc) CPUs"
say "repository $ROOT at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '(no git)')"

# --- python: $PYTHON, else the repository's .venv when it runs here, else python3 -------------------
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ] && timeout 20 "$ROOT/.venv/bin/python" -c 'import sys' 2>/dev/null; then
    PY="$ROOT/.venv/bin/python"
else
    [ -e "$ROOT/.venv/bin/python" ] && say "note: $ROOT/.venv/bin/python does not run on this machine; using python3"
    PY=python3
fi
# The repository first on the path: an editable install may point at where the venv was built.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! PY_VERSION=$(timeout 20 "$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1); then
    say "no usable python: $PY ($PY_VERSION); set PYTHON=/path/to/python3"
    finish 2
fi
say "python: $PY ($PY_VERSION)"
if ! missing=$(timeout 60 "$PY" - <<'EOF' 2>&1
import importlib
missing = []
for module, package in (("pynvml", "nvidia-ml-py"), ("psutil", "psutil"), ("prometheus_client", "prometheus-client"),
                        ("agent.main", "this repository (run from its root)")):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        missing.append(f"{module} ({package}): {exc}")
print("\n".join(missing))
raise SystemExit(1 if missing else 0)
EOF
); then
    PY_OK=0
    say "missing python modules in $PY:"
    say "$missing"
    case $missing in
        *pynvml*) say "pynvml is missing: install the package nvidia-ml-py into $PY (pip install nvidia-ml-py," \
                      "or a wheel copied to this machine); the agent's NVML backend cannot run without it" ;;
    esac
else
    PY_OK=1
    say "pynvml: $(timeout 20 "$PY" -c 'import pynvml, importlib.metadata as m; print(m.version("nvidia-ml-py"), getattr(pynvml, "__file__", ""))' 2>&1)"
fi

# --- 1. the driver ------------------------------------------------------------------------------------
say ""
say "== nvidia-smi"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "no NVIDIA driver: nvidia-smi not found on PATH"
    fail "nvidia-smi present"
    finish 2
fi
if ! timeout 30 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
    cat "$OUT/nvidia-smi.txt" >> "$REPORT"
    say "no NVIDIA driver: nvidia-smi failed (output above)"
    fail "nvidia-smi runs"
    finish 2
fi
tee -a "$REPORT" < "$OUT/nvidia-smi.txt"
DRIVER=$(timeout 20 nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)
GPUS=$(timeout 20 nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
say "driver version: $DRIVER; GPUs: $GPUS"
timeout 20 nvidia-smi -q >> "$OUT/nvidia-smi.txt" 2>&1
[ "$GPUS" -gt 0 ] || { fail "nvidia-smi lists at least one GPU"; finish 2; }
[ "$PY_OK" -eq 1 ] || { say "python modules missing (above): nothing more can be checked"; finish 2; }

free_port() {  # $1: tcp or udp
    "$PY" -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=='udp' else socket.SOCK_STREAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}
fetch() {  # $1: url, $2: file
    timeout 15 "$PY" -c "import sys,urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=10).read())" "$1" > "$2" 2>/dev/null
}
# Starts the agent in the background with extra flags "$@"; sets AGENT_PID and URL; waits until it answers.
start_agent() {
    local log=$1; shift
    local port eport
    port=$(free_port tcp); eport=$(free_port udp)
    URL="http://127.0.0.1:$port/metrics"
    timeout 120 "$PY" -m fleetscope agent --gpu-backend nvml --interval 1 --metrics-address "127.0.0.1:$port" \
        --events-address "127.0.0.1:$eport" --spool-dir "" "$@" > "$log" 2>&1 &
    AGENT_PID=$!
    for _ in $(seq 1 60); do
        if fetch "$URL" /dev/null; then return 0; fi
        if ! kill -0 "$AGENT_PID" 2>/dev/null; then break; fi
        sleep 0.5
    done
    say "the agent did not answer on $URL; the end of its log ($log):"
    tail -n 30 "$log" | tee -a "$REPORT"
    stop_agent
    return 1
}
promlint() {  # $1: exposition file; $2: a prefix of names whose lint warnings are expected (optional)
    local name problems
    name=$(basename "$1")
    if ! command -v promtool >/dev/null 2>&1; then
        say "promtool not found: $name not linted"
        return
    fi
    if problems=$(timeout 30 promtool check metrics < "$1" 2>&1); then
        pass "promtool check metrics $name"
        return
    fi
    if [ -n "${2:-}" ] && ! grep -qv "^$2" <<< "$problems"; then
        say "promtool: $(wc -l <<< "$problems") warnings, all on $2* names, which keep dcgm-exporter's spelling" \
            "(camelCase labels, counters without _total), e.g.:"
        head -n 3 <<< "$problems" | tee -a "$REPORT"
        pass "promtool check metrics $name: no problem outside the $2* names"
    else
        say "$problems"
        fail "promtool check metrics $name (problems above)"
    fi
}

# --- 2. the agent on NVML ---------------------------------------------------------------------------
say ""
say "== the agent, --gpu-backend nvml --interval 1, for ~20 s"
if start_agent "$OUT/agent.log"; then
    sleep 17
    mkdir -p "$OUT/rounds"
    for round in 1 2 3; do  # /metrics and nvidia-smi as close together as two processes allow
        fetch "$URL" "$OUT/rounds/metrics-$round.prom"
        timeout 20 nvidia-smi --query-gpu=index,uuid,power.draw,memory.used,clocks.sm,clocks.mem,temperature.gpu \
            --format=csv,noheader,nounits > "$OUT/rounds/nvidia-smi-$round.csv" 2>&1
        sleep 1
    done
    stop_agent
    cp "$OUT/rounds/metrics-3.prom" "$OUT/metrics.prom"
    say "$(grep -vc '^#' "$OUT/metrics.prom") series, $(wc -c < "$OUT/metrics.prom") bytes in metrics.prom"
    promlint "$OUT/metrics.prom"
    if grep -q '^fleetscope_agent_source_up{source="gpu"} 1' "$OUT/metrics.prom"; then pass "gpu source up"
    else fail "gpu source up (fleetscope_agent_source_up{source=\"gpu\"} is not 1; see agent.log)"; fi
    up=$(grep -c '^fleetscope_gpu_up{.*} 1' "$OUT/metrics.prom")
    if [ "$up" -eq "$GPUS" ]; then pass "fleetscope_gpu_up is 1 for all $GPUS GPUs"
    else fail "fleetscope_gpu_up is 1 for $up of $GPUS GPUs"; fi
    errors=$(grep '^fleetscope_gpu_nvml_errors_total' "$OUT/metrics.prom" | grep -v ' 0\.0$' | head -n 20)
    [ -n "$errors" ] && say "NVML errors the agent counted (not a check):" && say "$errors"

    say ""
    say "== /metrics against nvidia-smi, per GPU"
    if logged timeout 60 "$PY" - "$OUT/rounds" <<'EOF'
"""Compares the agent's GPU values with nvidia-smi's; exit 1 when any value disagrees in every round."""
import re
import sys
from pathlib import Path

rounds = Path(sys.argv[1])
MIB = 2**20
# agent metric, nvidia-smi column, scale from the agent's unit to nvidia-smi's, tolerance (|a - s| allowed), unit
CHECKS = (
    ("fleetscope_gpu_power_watts", "power.draw", 1.0, lambda s: max(0.10 * s, 20.0), "W"),
    # 5%, at least 16 MiB: an idle GPU's used memory is near 0
    ("fleetscope_gpu_memory_used_bytes", "memory.used", 1 / MIB, lambda s: max(0.05 * s, 16.0), "MiB"),
    ("fleetscope_gpu_sm_clock_hertz", "clocks.sm", 1e-6, lambda s: 0.10 * s, "MHz"),
    ("fleetscope_gpu_memory_clock_hertz", "clocks.mem", 1e-6, lambda s: 0.10 * s, "MHz"),
    ("fleetscope_gpu_temperature_celsius", "temperature.gpu", 1.0, lambda s: 3.0, "C"),
)
COLUMNS = ("index", "uuid", "power.draw", "memory.used", "clocks.sm", "clocks.mem", "temperature.gpu")
SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')


def agent_values(path):
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[(m.group(1), labels.get("uuid"))] = float(m.group(3))
    return out


def smi_values(path):
    rows = {}
    for line in path.read_text(errors="replace").splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == len(COLUMNS):
            rows[cells[1]] = dict(zip(COLUMNS, cells))
    return rows


pairs = [(agent_values(rounds / f"metrics-{r}.prom"), smi_values(rounds / f"nvidia-smi-{r}.csv")) for r in (1, 2, 3)]
uuids = sorted(set().union(*(smi.keys() for _, smi in pairs)), key=lambda u: int(pairs[0][1].get(u, {}).get("index", 0)))
if not uuids:
    print("FAIL  nvidia-smi's query gave no rows: " + (rounds / "nvidia-smi-1.csv").read_text()[:500])
    raise SystemExit(1)
failed = total = 0
for uuid in uuids:
    for metric, column, scale, tolerance, unit in CHECKS:
        seen, verdicts = [], set()
        for agent, smi in pairs:
            s_text = smi.get(uuid, {}).get(column, "")
            a = agent.get((metric, uuid))
            shown = "absent" if a is None else f"{a * scale:.1f}"
            try:
                s = float(s_text)
            except ValueError:  # [N/A], [Not Supported]: nvidia-smi has nothing to compare with
                seen.append(f"smi {s_text or 'absent'} / agent {shown}")
                verdicts.add("skip")
                continue
            seen.append(f"smi {s:g} / agent {shown}")
            verdicts.add("agree" if a is not None and abs(a * scale - s) <= tolerance(s) else "disagree")
        verdict = "PASS" if "agree" in verdicts else "FAIL" if "disagree" in verdicts else "SKIP"
        index = pairs[0][1].get(uuid, {}).get("index", "?")
        print(f"{verdict:4}  GPU {index} {uuid} {column} ({unit}; {metric}): " + "; ".join(seen))
        total += 1
        failed += verdict == "FAIL"
print(f"{failed} of {total} comparisons failed")
raise SystemExit(1 if failed else 0)
EOF
    then pass "values against nvidia-smi"
    else fail "values against nvidia-smi (FAIL lines above)"; fi
    info=$(timeout 20 nvidia-smi --query-gpu=index,memory.reserved,memory.total --format=csv,noheader 2>/dev/null)
    [ -n "$info" ] && say "for reference, nvidia-smi index, memory.reserved, memory.total:" && say "$info"
else
    fail "the agent starts with --gpu-backend nvml"
fi

# --- 4. NVML calls and time per sample, in-process -------------------------------------------------
say ""
say "== NVML calls and time per sample, in-process (agent.gpu.nvml.Nvml().read(), 3 warm-up + 20 samples)"
if logged timeout 150 "$PY" - <<'EOF'
"""Counts every call the agent makes into pynvml (calls pynvml makes to itself are not counted again)."""
import statistics
import threading
import time
import types
from collections import Counter

import pynvml

counts = Counter()
depth = threading.local()
HELPERS = {"nvmlStructToFriendlyObject", "nvmlFriendlyObjectToStruct", "nvmlExceptionClass"}


def counted(name, func):
    def call(*args, **kwargs):
        outer = getattr(depth, "n", 0) == 0
        if outer:
            counts[name] += 1
        depth.n = getattr(depth, "n", 0) + 1
        try:
            return func(*args, **kwargs)
        finally:
            depth.n -= 1
    return call


for name in dir(pynvml):
    value = getattr(pynvml, name)
    if name.startswith("nvml") and name not in HELPERS and isinstance(value, types.FunctionType):
        setattr(pynvml, name, counted(name, value))

from agent.gpu.nvml import Nvml  # noqa: E402 - after the counters are in place

nvml = Nvml()
t = time.perf_counter()
states = nvml.read()
print(f"first read (initialises NVML): {(time.perf_counter() - t) * 1000:.1f} ms, {len(states)} GPUs")
gpus = len(states)
for _ in range(2):
    nvml.read()
counts.clear()
times = []
for _ in range(20):
    t = time.perf_counter()
    nvml.read()
    times.append(time.perf_counter() - t)
nvml.shutdown()
if not gpus:
    print("the agent read no GPUs")
    raise SystemExit(1)
calls = sum(counts.values())
per_sample = statistics.median(times) * 1000
print(f"{calls / (20 * gpus):.1f} NVML calls per GPU per sample ({gpus} GPUs); "
      f"{per_sample:.2f} ms per sample median, {max(times) * 1000:.2f} max; "
      f"{statistics.median(times) / (calls / 20) * 1e6:.1f} us per call on average")
print("calls per GPU per sample: " + ", ".join(f"{n} {c / (20 * gpus):g}" for n, c in counts.most_common()))
EOF
then pass "in-process NVML sampling"
else fail "in-process NVML sampling (error above)"; fi

# --- 5. --compat dcgm ---------------------------------------------------------------------------------
say ""
say "== the agent with --compat dcgm, ~6 s"
if start_agent "$OUT/agent-dcgm.log" --compat dcgm; then
    sleep 5
    fetch "$URL" "$OUT/metrics-dcgm.prom"
    stop_agent
    promlint "$OUT/metrics-dcgm.prom" DCGM_FI_
    for name in DCGM_FI_DEV_GPU_TEMP DCGM_FI_DEV_POWER_USAGE DCGM_FI_DEV_FB_USED DCGM_FI_DEV_SM_CLOCK DCGM_FI_DEV_GPU_UTIL; do
        n=$(grep -c "^$name{" "$OUT/metrics-dcgm.prom")
        if [ "$n" -eq "$GPUS" ]; then pass "$name: $n series"
        else fail "$name: $n series, expected $GPUS"; fi
    done
else
    fail "the agent starts with --compat dcgm"
fi

if [ "$FAILS" -gt 0 ]; then finish 1; else finish 0; fi
