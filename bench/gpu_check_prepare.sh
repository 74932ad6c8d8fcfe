#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh needs on the device machine and cannot fetch there (it has no network):
#
#   bash bench/gpu_check_prepare.sh     # from anywhere; needs pip's network access here and promtool on PATH
#
# into .device/gpu_check/ (ignored: /.device/ is in .gitignore, and added to git's info/exclude too):
#   wheels/       the agent's dependencies that the device's image lacks, as wheels for its python
#                 (CPython 3.12, x86-64; the device tool's documentation lists the image's packages):
#                 msgspec only, at the version this repository's .venv has (fleetscope/schema.py,
#                 agent/shipper.py and agent/listener.py import it). nvidia-ml-py, psutil, prometheus-client,
#                 httpx and pyyaml are in the image; bcrypt is imported only for --web-config basic auth.
#   promtool.xz   this machine's promtool (a Go program that needs only libc), xz-compressed
#   prepared.txt  the commit and date it was prepared at, the files and their sizes
# then prints the device tool's run invocation. Run it again after a change of the wheels' versions; it
# keeps promtool.xz while promtool is older than it.
# DEVICE_PYTHON (3.12): the device's python version, several separated by spaces for several;
# WHEELS: the requirements to download (default: msgspec==<the .venv's version>);
# GPU_CHECK_DEVICE_DIR: another folder than .device/gpu_check (then nothing is added to info/exclude).

set -eu -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=${GPU_CHECK_DEVICE_DIR:-$ROOT/.device/gpu_check}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
if [ -z "${WHEELS:-}" ]; then
    version=$("$PY" -c 'import importlib.metadata as m; print(m.version("msgspec"))' 2>/dev/null || true)
    WHEELS="msgspec${version:+==$version}"
fi

if [ -z "${GPU_CHECK_DEVICE_DIR:-}" ] && git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    exclude=$(git -C "$ROOT" rev-parse --git-path info/exclude)
    case $exclude in /*) ;; *) exclude="$ROOT/$exclude" ;; esac
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >> "$exclude"
    git -C "$ROOT" check-ignore -q .device/gpu_check/x || { echo "could not make .device/ ignored ($exclude)" >&2; exit 1; }
fi

mkdir -p "$DEST"
rm -rf "$DEST/wheels.new"
mkdir -p "$DEST/wheels.new"
for pyver in $DEVICE_PYTHON; do
    # shellcheck disable=SC2086 # one word per requirement
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST/wheels.new" $WHEELS
done
rm -rf "$DEST/wheels"
mv "$DEST/wheels.new" "$DEST/wheels"

if promtool=$(command -v promtool); then
    if [ ! -s "$DEST/promtool.xz" ] || [ "$promtool" -nt "$DEST/promtool.xz" ]; then
        echo "compressing $promtool ($(du -h "$promtool" | cut -f1)); about half a minute"
        xz -9e -T1 -c "$promtool" > "$DEST/promtool.xz.new"
        mv "$DEST/promtool.xz.new" "$DEST/promtool.xz"
    fi
else
    rm -f "$DEST/promtool.xz"
    echo "no promtool here: the device check's lint checks will FAIL as NOT LINTED (apt-get install prometheus)" >&2
fi

{
    echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ) at commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "for python $DEVICE_PYTHON: $(cd "$DEST" && find wheels promtool.xz -type f 2>/dev/null | sort | xargs -r du -b | awk '{printf "%s (%d bytes) ", $2, $1}')"
} > "$DEST/prepared.txt"

cat "$DEST/prepared.txt"
carried=$(du -sb "$DEST" | cut -f1)
tree=$(git -C "$ROOT" ls-files -z --cached --others --exclude-standard 2>/dev/null | (cd "$ROOT" && xargs -0 -r du -b 2>/dev/null) | awk '{s += $1} END {print s + 0}')
echo "carried: $DEST $((carried / 1024)) KiB; the tree that travels besides: $((tree / 1024)) KiB;" \
    "together $(((carried + tree) / 1048576)) MiB of the 64 MiB a run may send"
if [ $((carried + tree)) -ge $((64 * 1048576)) ]; then
    echo "over 64 MiB: the run would be refused" >&2
    exit 1
fi
rel=${DEST#"$ROOT"/}
echo "device tool: run(command=\"bash bench/gpu_check.sh\", carry=[\"$rel\"], timeout_s=300)"
