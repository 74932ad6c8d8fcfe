#!/usr/bin/env bash
# Checks the agent's NVML backend on a real NVIDIA machine, in about a minute; never waits unbounded.
#
# On the workplace's device machine (no network there: nothing can be installed from a registry):
#   1. here, once per session (needs the network here; ~30 s, most of it compressing promtool):
#        bash bench/gpu_check_prepare.sh
#      It fills the ignored folder .device/gpu_check/ (git's info/exclude ignores /.device/) with what the
#      device's image lacks: wheels/ (msgspec for CPython 3.12, the device's python3; the agent imports it)
#      and promtool.xz (this machine's promtool, xz-compressed, ~9 MB), and prints the sizes (with the
#      tree, ~12 MiB of the 64 MiB a run may send). The device's python3 (3.12, PyTorch's; the device
#      docs' KINDS.md) has nvidia-ml-py, psutil, prometheus-client, httpx and pyyaml, not msgspec.
#   2. the device tool's run, with exactly:
#        command:   bash bench/gpu_check.sh
#        carry:     [".device/gpu_check"]
#        timeout_s: 300        (the script takes about a minute, every wait in it is bounded; 300 leaves
#                              device time to run it again)
#      $OUT there gets report.txt and gpu_check.tar.gz (every other file), well inside the 8 files that
#      come back; the output's tail is the report too. A run cut at its limit still returns report.txt
#      as far as it got (it is written as the checks go; the archive is made at the end).
# Anywhere else, from the repository root:
#   bash bench/gpu_check.sh            # report and archive in ${OUT:-${TMPDIR:-/tmp}/fleetscope-gpu_check}
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# 0. python modules: those the agent needs and this python lacks are installed from the carried wheels
#    (pip install --no-index into a temporary folder put on PYTHONPATH); promtool: $GPU_CHECK_PROMTOOL, else
#    the carried promtool.xz, else promtool on PATH;
# 1. nvidia-smi and the driver version (nvidia-smi.txt);
# 2. the agent (--gpu-backend nvml, 1 s samples) for ~20 s, alive at every fetch; /metrics (metrics.prom)
#    not empty and linted by promtool (no promtool: that check FAILS, marked NOT LINTED);
# 3. power, memory used, SM and memory clocks and temperature per GPU against nvidia-smi, in the
#    agent's units (W, bytes, Hz, C) against nvidia-smi's (W, MiB, MHz, C); three rounds, a value
#    passes when one round agrees (the two read at slightly different moments; a unit or scale
#    error never agrees);
# 4. in-process: NVML calls per GPU per sample and time per sample of agent.gpu.nvml.Nvml().read()
#    (bench/gpu_check_nvml.py: counted at the C functions, the field-value batches included, before shutdown);
# 5. the agent with --compat dcgm: a few DCGM_FI_DEV_* series present, one per GPU.
# The end of each agent's log is in the report. Exit status: 0 when every check passed, 1 when one
# failed, 2 when the machine cannot run them (no driver, a module missing and not carried, no python);
# report.txt says which.
# GPU_CHECK_AGENT_S (17), GPU_CHECK_DCGM_S (5) and GPU_CHECK_SAMPLES (20) shorten the waits and samples
# (the dry-run test, tests/agent/test_gpu_check.py); GPU_CHECK_DEVICE_DIR: where the carried files are
# (.device/gpu_check); GPU_CHECK_PROMTOOL: the promtool to use.

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-${TMPDIR:-/tmp}/fleetscope-gpu_check}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/report.txt"
ARCHIVE="$OUT/gpu_check.tar.gz"
rm -f "$ARCHIVE"
: > "$REPORT"
# Every file but the report is written to $FILES and packed into one archive at the end (few files come
# back from the device); the installed wheels and promtool go to $WORK beside it, not into the archive.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
FILES="$WORK/files"
mkdir -p "$FILES" || exit 2
CARRIED=${GPU_CHECK_DEVICE_DIR:-$ROOT/.device/gpu_check}
AGENT_S=${GPU_CHECK_AGENT_S:-17}
DCGM_S=${GPU_CHECK_DCGM_S:-5}
SAMPLES=${GPU_CHECK_SAMPLES:-20}
FAILS=0
AGENT_PID=""
AGENT_LOG=""
PROMTOOL=""

say() { printf '%s\n' "$*" | tee -a "$REPORT"; }
# Runs a command with its output in the report; returns its status.
logged() { "$@" 2>&1 | tee -a "$REPORT"; return "${PIPESTATUS[0]}"; }
pass() { say "PASS  $*"; }
fail() { say "FAIL  $*"; FAILS=$((FAILS + 1)); }
pack() {
    [ -d "$FILES" ] || return 0
    cp "$REPORT" "$FILES/report.txt" 2>/dev/null
    if tar -czf "$ARCHIVE" -C "$FILES" . 2>/dev/null \
        || "${PY:-python3}" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "w:gz").add(sys.argv[2], arcname=".")' \
            "$ARCHIVE" "$FILES" 2>/dev/null; then
        say "the other files ($(cd "$FILES" && find . -type f | sort | sed 's|^\./||' | tr '\n' ' ' | sed 's/ $//')) are in $ARCHIVE"
    else
        say "could not pack $FILES into $ARCHIVE"
    fi
    rm -rf "$WORK"
}
finish() {
    stop_agent
    say ""
    pack
    if [ "$1" -eq 2 ]; then
        say "RESULT: could not run the checks (see above); report in $REPORT"
    elif [ "$FAILS" -gt 0 ]; then
        say "RESULT: $FAILS check(s) FAILED; report in $REPORT"
    else
        say "RESULT: every check passed; report in $REPORT"
    fi
    exit "$1"
}
agent_tail() {  # the end of the current agent's log, in the report
    [ -n "$AGENT_LOG" ] && [ -f "$AGENT_LOG" ] || return 0
    if [ -s "$AGENT_LOG" ]; then
        say "-- the end of $(basename "$AGENT_LOG") ($(wc -l < "$AGENT_LOG") lines):"
        tail -n 15 "$AGENT_LOG" | cut -c1-300 | tee -a "$REPORT"
        say "--"
    else
        say "-- $(basename "$AGENT_LOG") is empty"
    fi
}
stop_agent() {
    if [ -n "$AGENT_PID" ]; then
        kill "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
        AGENT_PID=""
        agent_tail
    fi
}
trap 'stop_agent; rm -rf "$WORK"' EXIT
trap 'say "interrupted"; finish 2' INT TERM

say "fleetscope gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname 2>/dev/null || cat /proc/sys/kernel/hostname), $(nproc) CPUs"
say "repository $ROOT at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
[ -f "$CARRIED/prepared.txt" ] && say "carried files: $(tr '\n' ' ' < "$CARRIED/prepared.txt")"

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
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
if ! PY_VERSION=$(timeout 20 "$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1); then
    say "no usable python: $PY ($PY_VERSION); set PYTHON=/path/to/python3"
    finish 2
fi
say "python: $PY ($PY_VERSION)"
# Prints "module package" for each module missing in $PY (agent.main last: it imports the others).
missing_modules() {
    timeout 60 "$PY" - <<'EOF' 2>&1
import importlib
for module, package in (("pynvml", "nvidia-ml-py"), ("psutil", "psutil"), ("prometheus_client", "prometheus-client"),
                        ("msgspec", "msgspec"), ("httpx", "httpx"), ("yaml", "pyyaml"),
                        ("agent.main", "this-repository")):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        print(module, package, str(exc).replace("\n", " "))
EOF
}
missing=$(missing_modules)
if [ -n "$missing" ]; then
    say "modules missing in $PY:"
    say "$missing"
    packages=$(awk '$2 != "this-repository" {print $2}' <<< "$missing" | sort -u | tr '\n' ' ')
    if [ -n "${packages// /}" ] && [ -d "$CARRIED/wheels" ]; then
        SITE="$WORK/site"
        say "installing ${packages% } from $CARRIED/wheels ($(ls "$CARRIED/wheels" | tr '\n' ' ' | sed 's/ $//')) into $SITE"
        # shellcheck disable=SC2086 # one word per package
        if ! logged timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --find-links "$CARRIED/wheels" --target "$SITE" $packages; then
            say "pip could not install them: the wheels were prepared for another python (bench/gpu_check_prepare.sh" \
                "DEVICE_PYTHON=${PY_VERSION%.*}), or a package has no wheel there (its WHEELS=...)"
        fi
        export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
        missing=$(missing_modules)
    elif [ -n "${packages// /}" ]; then
        say "no wheels carried ($CARRIED/wheels is absent): run bench/gpu_check_prepare.sh here and carry .device/gpu_check"
    fi
fi
if [ -n "$missing" ]; then
    PY_OK=0
    say "still missing in $PY:"
    say "$missing"
    case $missing in
        *pynvml*) say "pynvml is missing: install the package nvidia-ml-py into $PY (pip install nvidia-ml-py," \
                      "or a wheel copied to this machine); the agent's NVML backend cannot run without it" ;;
    esac
else
    PY_OK=1
    say "pynvml: $(timeout 20 "$PY" -c 'import pynvml, importlib.metadata as m; print(m.version("nvidia-ml-py"), getattr(pynvml, "__file__", ""))' 2>&1)"
    say "msgspec: $(timeout 20 "$PY" -c 'import msgspec; print(msgspec.__version__, msgspec.__file__)' 2>&1)"
fi

# --- promtool: $GPU_CHECK_PROMTOOL, else the carried promtool.xz, else promtool on PATH ---------------
if [ -n "${GPU_CHECK_PROMTOOL:-}" ]; then
    PROMTOOL=$GPU_CHECK_PROMTOOL
elif [ -f "$CARRIED/promtool.xz" ]; then
    mkdir -p "$WORK/bin"
    if xz -dc "$CARRIED/promtool.xz" > "$WORK/bin/promtool" 2>/dev/null \
        || "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$CARRIED/promtool.xz" "$WORK/bin/promtool"; then
        chmod +x "$WORK/bin/promtool"
        PROMTOOL="$WORK/bin/promtool"
    else
        say "could not decompress $CARRIED/promtool.xz"
    fi
elif command -v promtool >/dev/null 2>&1; then
    PROMTOOL=$(command -v promtool)
fi
if [ -n "$PROMTOOL" ] && version=$(timeout 20 "$PROMTOOL" --version 2>&1 | head -n 1); then
    say "promtool: $PROMTOOL ($version)"
else
    [ -n "$PROMTOOL" ] && say "promtool at $PROMTOOL does not run: $version"
    PROMTOOL=""
    say "promtool: none usable (GPU_CHECK_PROMTOOL, $CARRIED/promtool.xz, PATH): every lint check below FAILS as NOT LINTED"
fi

# --- 1. the driver ------------------------------------------------------------------------------------
say ""
say "== nvidia-smi"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "no NVIDIA driver: nvidia-smi not found on PATH"
    fail "nvidia-smi present"
    finish 2
fi
if ! timeout 30 nvidia-smi > "$FILES/nvidia-smi.txt" 2>&1; then
    cat "$FILES/nvidia-smi.txt" >> "$REPORT"
    say "no NVIDIA driver: nvidia-smi failed (output above)"
    fail "nvidia-smi runs"
    finish 2
fi
tee -a "$REPORT" < "$FILES/nvidia-smi.txt"
DRIVER=$(timeout 20 nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)
GPUS=$(timeout 20 nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
say "driver version: $DRIVER; GPUs: $GPUS"
timeout 20 nvidia-smi -q >> "$FILES/nvidia-smi.txt" 2>&1
[ "$GPUS" -gt 0 ] || { fail "nvidia-smi lists at least one GPU"; finish 2; }
[ "$PY_OK" -eq 1 ] || { say "python modules missing (above): nothing more can be checked"; finish 2; }

free_port() {  # $1: tcp or udp
    "$PY" -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=='udp' else socket.SOCK_STREAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}
fetch() {  # $1: url, $2: file
    timeout 12 "$PY" -c "import sys,urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=8).read())" "$1" > "$2" 2>/dev/null
}
agent_alive() { [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; }
# The agent must still run and /metrics answer something: a dead agent's empty answer lints clean.
fetch_metrics() {  # $1: file
    local status
    if ! agent_alive; then
        wait "$AGENT_PID" 2>/dev/null; status=$?
        fail "the agent is running at the fetch of $(basename "$1") (it exited with status $status; its log below)"
        AGENT_PID=""
        agent_tail
        return 1
    fi
    if ! fetch "$URL" "$1" || [ ! -s "$1" ]; then
        fail "/metrics answers at the fetch of $(basename "$1") (nothing came back from $URL)"
        return 1
    fi
}
# Starts the agent in the background with extra flags "$@"; sets AGENT_PID, AGENT_LOG and URL; waits until it answers.
start_agent() {
    local port eport
    AGENT_LOG=$1; shift
    port=$(free_port tcp); eport=$(free_port udp)
    URL="http://127.0.0.1:$port/metrics"
    timeout 120 "$PY" -m fleetscope agent --gpu-backend nvml --interval 1 --metrics-address "127.0.0.1:$port" \
        --events-address "127.0.0.1:$eport" --spool-dir "" "$@" > "$AGENT_LOG" 2>&1 &
    AGENT_PID=$!
    local deadline=$((SECONDS + 30))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if fetch "$URL" /dev/null; then return 0; fi
        if ! agent_alive; then break; fi
        sleep 0.5
    done
    say "the agent did not answer on $URL within 30 s"
    stop_agent
    return 1
}
promlint() {  # $1: exposition file; $2: a prefix of names whose lint warnings are expected (optional)
    local name problems
    name=$(basename "$1")
    if [ ! -s "$1" ]; then
        fail "promtool check metrics $name: the file is empty (an empty exposition lints clean; nothing was checked)"
        return
    fi
    if [ -z "$PROMTOOL" ]; then
        fail "promtool check metrics $name: NOT LINTED, promtool missing (carry .device/gpu_check, made by bench/gpu_check_prepare.sh)"
        return
    fi
    if problems=$(timeout 30 "$PROMTOOL" check metrics < "$1" 2>&1); then
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
say "== the agent, --gpu-backend nvml --interval 1, for ~$((AGENT_S + 3)) s"
if start_agent "$FILES/agent.log"; then
    sleep "$AGENT_S"
    mkdir -p "$FILES/rounds"
    rounds_ok=1
    for round in 1 2 3; do  # /metrics and nvidia-smi as close together as two processes allow
        fetch_metrics "$FILES/rounds/metrics-$round.prom" || { rounds_ok=0; break; }
        timeout 20 nvidia-smi --query-gpu=index,uuid,power.draw,memory.used,clocks.sm,clocks.mem,temperature.gpu \
            --format=csv,noheader,nounits > "$FILES/rounds/nvidia-smi-$round.csv" 2>&1
        sleep 1
    done
    stop_agent
fi
if [ -z "${rounds_ok:-}" ]; then
    fail "the agent starts with --gpu-backend nvml"
elif [ "$rounds_ok" -eq 0 ]; then
    say "the agent's /metrics was not read three times: its values are not checked"
else
    cp "$FILES/rounds/metrics-3.prom" "$FILES/metrics.prom"
    say "$(grep -vc '^#' "$FILES/metrics.prom") series, $(wc -c < "$FILES/metrics.prom") bytes in metrics.prom"
    promlint "$FILES/metrics.prom"
    if grep -q '^fleetscope_agent_source_up{source="gpu"} 1' "$FILES/metrics.prom"; then pass "gpu source up"
    else fail "gpu source up (fleetscope_agent_source_up{source=\"gpu\"} is not 1; see agent.log)"; fi
    up=$(grep -c '^fleetscope_gpu_up{.*} 1' "$FILES/metrics.prom")
    if [ "$up" -eq "$GPUS" ]; then pass "fleetscope_gpu_up is 1 for all $GPUS GPUs"
    else fail "fleetscope_gpu_up is 1 for $up of $GPUS GPUs"; fi
    errors=$(grep '^fleetscope_gpu_nvml_errors_total' "$FILES/metrics.prom" | grep -v ' 0\.0$' | head -n 20)
    [ -n "$errors" ] && say "NVML errors the agent counted (not a check):" && say "$errors"

    say ""
    say "== /metrics against nvidia-smi, per GPU"
    if logged timeout 60 "$PY" - "$FILES/rounds" <<'EOF'
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
fi

# --- 4. NVML calls and time per sample, in-process -------------------------------------------------
say ""
say "== NVML calls and time per sample, in-process (agent.gpu.nvml.Nvml().read(), 3 warm-up + $SAMPLES samples)"
if logged timeout 90 "$PY" -m bench.gpu_check_nvml --samples "$SAMPLES" --warmup 3
then pass "in-process NVML sampling"
else fail "in-process NVML sampling (error above)"; fi

# --- 5. --compat dcgm ---------------------------------------------------------------------------------
say ""
say "== the agent with --compat dcgm, ~$((DCGM_S + 1)) s"
if start_agent "$FILES/agent-dcgm.log" --compat dcgm; then
    sleep "$DCGM_S"
    if fetch_metrics "$FILES/metrics-dcgm.prom"; then
        stop_agent
        promlint "$FILES/metrics-dcgm.prom" DCGM_FI_
        for name in DCGM_FI_DEV_GPU_TEMP DCGM_FI_DEV_POWER_USAGE DCGM_FI_DEV_FB_USED DCGM_FI_DEV_SM_CLOCK DCGM_FI_DEV_GPU_UTIL; do
            n=$(grep -c "^$name{" "$FILES/metrics-dcgm.prom")
            if [ "$n" -eq "$GPUS" ]; then pass "$name: $n series"
            else fail "$name: $n series, expected $GPUS"; fi
        done
    fi
    stop_agent
else
    fail "the agent starts with --compat dcgm"
fi

if [ "$FAILS" -gt 0 ]; then finish 1; else finish 0; fi
