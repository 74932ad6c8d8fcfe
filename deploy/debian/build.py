"""Build fleetscope's wheel and the agent's Debian package, offline: `make package` (python deploy/debian/build.py).

    dist/fleetscope-<version>-py3-none-any.whl         pip install '<that file>[agent]'
    dist/fleetscope-agent_<version>_<arch>.deb          dpkg -i <that file>

The .deb holds a virtual environment at /opt/fleetscope on Debian's python3.11 (--python): fleetscope from
the wheel, and the agent extra's dependencies copied, file by file (their RECORD), from the environment this
script runs in, where `make` installed them. So the build needs no network, and the package carries exactly
the versions the tests ran with. That environment must be the same Python minor version as --python (their
compiled modules are loaded by it). The unit goes to /lib/systemd/system (enabled, started once configured:
deploy/debian/postinst), the example agent.toml to /etc/fleetscope/agent.toml (a conffile).

The wheel is built from a copy of the source tree, so setuptools' build/ and egg-info never land in the checkout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PREFIX = "/opt/fleetscope"
PACKAGE = "fleetscope-agent"
# What the wheel is built from (pyproject.toml's packages and readme).
SOURCES = ["pyproject.toml", "README.md", "fleetscope", "agent", "collector", "dashboards", "alerts"]

CONTROL = """\
Package: {package}
Version: {version}
Architecture: {arch}
Maintainer: fleetscope developers <fleetscope@example.invalid>
Installed-Size: {size_kib}
Depends: python3.11, adduser
Section: admin
Priority: optional
Homepage: https://github.com/fleetscope/fleetscope
Description: fleetscope agent: GPU and host telemetry for AI datacenters
 Samples a node's GPUs (NVML), CPUs, memory, disks, networks and InfiniBand,
 serves them to Prometheus on :9835/metrics, and ships them with the training
 and inference events of the node's workloads to a fleetscope collector.
 Runs as the systemd service fleetscope-agent, sandboxed, once
 /etc/fleetscope/agent.toml names the collector.
"""

COPYRIGHT = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fleetscope
Source: https://github.com/fleetscope/fleetscope

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0. The Python packages under
 /opt/fleetscope/lib carry their own licenses in their *.dist-info folders.
"""


def run(argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, **kwargs)


def build_wheel(out: Path, work: Path) -> Path:
    """fleetscope's wheel, built without build isolation (setuptools from this environment, no index)."""
    src = work / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    before = set(out.glob("fleetscope-*.whl"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", str(out), str(src)], stdout=subprocess.DEVNULL)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    wheel = out / f"fleetscope-{version}-py3-none-any.whl"
    if not wheel.exists():
        raise SystemExit(f"build: pip wheel wrote {sorted(set(out.glob('*.whl')) - before)}, not {wheel.name}")
    return wheel


def agent_distributions() -> list[importlib.metadata.Distribution]:
    """The agent extra's requirements and theirs, as installed here; a missing or mismatched one is an error."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["optional-dependencies"]["agent"]]
    found: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"build: {req.name} (for the agent) is not installed in {sys.prefix}: "
                             f"{sys.executable} -m pip install '.[agent]' first (make does)") from None
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"build: the agent needs {req}, {sys.prefix} has {dist.version}")
        found[key] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return [found[k] for k in sorted(found)]


def copy_distribution(dist: importlib.metadata.Distribution, site: Path) -> int:
    """Copy one installed distribution's files (its RECORD, less byte code and scripts) into `site`."""
    copied = 0
    for rel in dist.files or []:
        parts = Path(rel).parts
        if parts[0] == ".." or "__pycache__" in parts or rel.name == "direct_url.json":
            continue  # console scripts (the agent needs none), byte code (postinst compiles), the build's paths
        src = Path(dist.locate_file(rel))
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied += 1
    if not copied:
        raise SystemExit(f"build: {dist.metadata['Name']} lists no files (RECORD) to copy from {sys.prefix}")
    return copied


def make_venv(root: Path, python: str, wheel: Path) -> None:
    """The environment at root/opt/fleetscope, with its paths rewritten to /opt/fleetscope."""
    prefix = root / PREFIX.lstrip("/")
    run([python, "-m", "venv", "--without-pip", str(prefix)])
    target_version = run([str(prefix / "bin" / "python"), "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True).stdout.split()
    if [int(v) for v in target_version] != list(sys.version_info[:2]):
        raise SystemExit(f"build: {python} is Python {'.'.join(target_version)}, but the agent's dependencies come from "
                         f"{sys.prefix} (Python {sys.version_info[0]}.{sys.version_info[1]}): their compiled modules would not load")
    run([sys.executable, "-m", "pip", "--python", str(prefix / "bin" / "python"), "install", "-q", "--no-deps", "--no-index",
         "--no-compile", "--disable-pip-version-check", str(wheel)], stdout=subprocess.DEVNULL)
    site = next(prefix.glob("lib/python3.*/site-packages"))
    for dist in agent_distributions():
        copy_distribution(dist, site)
    for path in site.glob("fleetscope-*.dist-info/direct_url.json"):
        path.unlink()
    # venv and pip wrote the build folder into scripts, activate* and pyvenv.cfg: it must be /opt/fleetscope.
    staged = str(prefix).encode()
    for path in [*prefix.joinpath("bin").iterdir(), prefix / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if staged in data:
                path.write_bytes(data.replace(staged, PREFIX.encode()))
    leaked = run(["grep", "-rlF", str(prefix), str(prefix)], capture_output=True, text=True, check=False).stdout
    if leaked:
        raise SystemExit(f"build: the build folder {prefix} is still named in:\n{leaked}")


def du_kib(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if not p.is_dir()) // 1024 + 1


def build_deb(out: Path, work: Path, wheel: Path, python: str) -> Path:
    sys.path.insert(0, str(REPO))
    from fleetscope import assets

    root = work / "root"
    make_venv(root, python, wheel)
    unit_dir = root / "lib/systemd/system"
    unit_dir.mkdir(parents=True)
    shutil.copyfile(assets.agent_unit(), unit_dir / assets.UNIT_NAME)
    etc = root / "etc/fleetscope"
    etc.mkdir(parents=True)
    shutil.copyfile(assets.agent_config_example(), etc / "agent.toml")
    slurm = root / "usr/share/fleetscope/slurm"  # slurm.conf's Prolog= and Epilog= (README "Run on Slurm")
    slurm.mkdir(parents=True)
    for script in ("prolog.sh", "epilog.sh"):
        shutil.copyfile(REPO / "deploy" / "slurm" / script, slurm / script)
        (slurm / script).chmod(0o755)
    doc = root / f"usr/share/doc/{PACKAGE}"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(COPYRIGHT)
    debian = root / "DEBIAN"
    debian.mkdir()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    arch = run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    (debian / "control").write_text(CONTROL.format(package=PACKAGE, version=version, arch=arch, size_kib=du_kib(root)))
    (debian / "conffiles").write_text("/etc/fleetscope/agent.toml\n")
    for script in ("postinst", "prerm", "postrm"):
        shutil.copyfile(HERE / script, debian / script)
        (debian / script).chmod(0o755)
    for path in root.rglob("*"):  # whatever the umask: files 0644 (scripts 0755), folders 0755
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    deb = out / f"{PACKAGE}_{version}_{arch}.deb"
    # gzip at level 1: a few seconds instead of xz's minute, for a package of ~10 MB.
    run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(root), str(deb)], stdout=subprocess.DEVNULL)
    return deb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "dist"), help="where the wheel and the .deb go (default dist/)")
    p.add_argument("--python", default="/usr/bin/python3.11", help="the interpreter the package's environment runs on")
    p.add_argument("--wheel-only", action="store_true", help="build the wheel alone")
    args = p.parse_args(argv)
    for tool in ("dpkg-deb", "dpkg") if not args.wheel_only else ():
        if shutil.which(tool) is None:
            raise SystemExit(f"build: {tool} is not installed (Debian's dpkg package has it)")
    if not args.wheel_only and not os.access(args.python, os.X_OK):
        raise SystemExit(f"build: {args.python} is not there: apt-get install python3.11, or give --python")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleetscope-package-") as tmp:
        wheel = build_wheel(out, Path(tmp))
        print(wheel)
        if not args.wheel_only:
            print(build_deb(out, Path(tmp), wheel, args.python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
