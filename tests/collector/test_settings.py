"""The collector's settings: the [collector] table, flags over it, units, and errors that name the key."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from collector.settings import (GiB, Settings, cgroup_memory_limit, default_memory_budget, load_config,
                                parse_duration, parse_size, size_polars_pool)

TOKENS = {"ingest_tokens": frozenset({"i"}), "read_tokens": frozenset({"r"})}


def test_every_storage_setting_is_read_from_the_config_file(tmp_path):
    path = tmp_path / "collector.toml"
    path.write_text(f"""
[collector]
data_dir = "{tmp_path / 'data'}"
cluster = "eu-1"
memory_budget = "1GiB"
window = "2h"
raw_window = "90s"
raw_steps = 60
retention = "14d"
retention_bytes = "50GB"
checkpoint_interval = 10
ingest_processes = 2
listen = "127.0.0.1:9999"

[[slo]]
name = "chat-ttft"
service = "chat"
indicator = "ttft"
threshold_s = 0.5
objective = 0.99
""")
    kwargs, other = load_config(path)
    s = Settings(**kwargs, **TOKENS)
    assert (s.data_dir, s.cluster, s.memory_budget, s.window_s, s.raw_window_s, s.raw_steps) == (
        tmp_path / "data", "eu-1", 2**30, 7200.0, 90.0, 60)
    assert (s.retention_s, s.retention_bytes, s.checkpoint_interval_s) == (14 * 86400.0, 50 * 10**9, 10.0)
    assert s.ingest_processes == 2
    assert other == {"listen": "127.0.0.1:9999"} and [slo.name for slo in s.slos] == ["chat-ttft"]


@pytest.mark.parametrize("text, words", [
    ("[collector]\nretention_byte = 5\n", ["unknown setting", "'retention_byte'", "retention_bytes"]),
    ("[collectr]\n", ["unknown table", "'collectr'"]),
    ("[collector]\nmemory_budget = \"lots\"\n", ["memory_budget", "'lots'"]),
    ("[collector]\nwindow = \"6 fortnights\"\n", ["window", "duration"]),
    ("[collector]\ningest_processes = \"two\"\n", ["ingest_processes", "whole number"]),
    ("[collector]\ningest_processes = -1\n", ["ingest_processes", "0 or more"]),
    ("[[slo]]\nname = \"x\"\nservice = \"s\"\nindicator = \"ttft\"\nobjective = 0.99\nsurprise = 1\n", ["slo 1", "surprise"]),
])
def test_a_mistake_in_the_config_file_is_an_error_that_names_it(tmp_path, text, words):
    path = tmp_path / "collector.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        kwargs, _ = load_config(path)
        Settings(**kwargs, **TOKENS)
    for word in words:
        assert word in str(err.value)


def test_units():
    assert parse_size("2GiB", "x") == 2 * 2**30 and parse_size(1000, "x") == 1000 and parse_size("1.5 MB", "x") == 1_500_000
    assert parse_duration("30d", "x") == 30 * 86400 and parse_duration("90s", "x") == 90 and parse_duration(5, "x") == 5


def test_retention_by_size_defaults_to_a_share_of_the_data_disk(tmp_path):
    s = Settings(data_dir=tmp_path / "not-yet", **TOKENS)
    assert s.retention_bytes == int(shutil.disk_usage(tmp_path).total * 0.4)
    assert 128 * 2**20 <= s.memory_budget <= 2 * 2**30


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_the_command_line_refuses_an_unknown_key_and_flags_win_over_the_file(tmp_path):
    path = tmp_path / "collector.toml"
    path.write_text("[collector]\nretention_bytez = 1\n")
    env = {"FLEETSCOPE_INGEST_TOKEN": "i", "FLEETSCOPE_READ_TOKEN": "r", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "fleetscope", "collector", "--config", str(path)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "retention_bytez" in out.stderr
    path.write_text("[collector]\nmemory_budget = \"1GiB\"\n")
    out = subprocess.run([sys.executable, "-m", "fleetscope", "collector", "--config", str(path), "--memory-budget", "1MiB"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "memory_budget" in out.stderr and "128 MiB" in out.stderr  # the flag's value was used


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_the_input_bound_flags_reach_the_settings_and_bad_values_are_named(tmp_path):
    env = {"FLEETSCOPE_INGEST_TOKEN": "i", "FLEETSCOPE_READ_TOKEN": "r", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "fleetscope", "collector", "--data-dir", str(tmp_path),
                          "--max-step-jump", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--max-step-jump must be positive" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fleetscope", "collector", "--data-dir", str(tmp_path),
                          "--metrics-max-jobs", "many"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--metrics-max-jobs must be a whole number" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fleetscope", "collector", "--data-dir", str(tmp_path),
                          "--max-future-skew", "soon"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--max-future-skew" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fleetscope", "collector", "--data-dir", str(tmp_path),
                          "--ingest-processes", "-1"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--ingest-processes must be 0 or more" in out.stderr


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_the_straggler_page_share_comes_from_the_file_or_the_flag_and_must_be_a_share(tmp_path):
    path = tmp_path / "collector.toml"
    path.write_text("[collector]\nstraggler_page_share = 0.1\n")
    kwargs, _ = load_config(path)
    assert Settings(**kwargs, data_dir=tmp_path, **TOKENS).straggler_page_share == 0.1
    assert Settings(data_dir=tmp_path, **TOKENS).straggler_page_share == 0.05
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="straggler_page_share"):
            Settings(straggler_page_share=bad, data_dir=tmp_path, **TOKENS)
    path.write_text('[collector]\nstraggler_page_share = "ten percent"\n')
    with pytest.raises(ValueError, match="straggler_page_share"):
        load_config(path)
    env = {"FLEETSCOPE_INGEST_TOKEN": "i", "FLEETSCOPE_READ_TOKEN": "r", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "fleetscope", "collector", "--data-dir", str(tmp_path),
                          "--straggler-page-share", "2"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "straggler_page_share" in out.stderr


def _cgroup_tree(root, files: dict[str, str]):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_polars_gets_one_thread_fewer_than_the_cpus_unless_the_operator_chose():
    for cpus, threads in ((1, 1), (2, 1), (4, 3), (64, 63)):
        environ: dict[str, str] = {}
        assert size_polars_pool(environ, cpus) == threads and environ == {"POLARS_MAX_THREADS": str(threads)}
    environ = {"POLARS_MAX_THREADS": "8"}
    assert size_polars_pool(environ, 2) is None and environ == {"POLARS_MAX_THREADS": "8"}


def test_the_memory_budget_defaults_within_the_cgroups_limit(tmp_path):
    """In a pod with limits.memory (or a unit with MemoryMax) the default budget is half the limit, not a quarter
    of the host's memory: a 2 GiB budget in a 1 GiB pod would be OOM-killed long before the budget bit."""
    v2 = tmp_path / "v2"
    # cgroup v2: the tightest of the process's folder and its ancestors; "max" is no limit
    _cgroup_tree(v2, {"kubepods.slice/memory.max": "3221225472\n", "kubepods.slice/pod1/memory.max": "max\n",
                      "kubepods.slice/pod1/c1/memory.max": "max\n", "self": "0::/kubepods.slice/pod1/c1\n"})
    assert cgroup_memory_limit(str(v2), str(v2 / "self")) == 3 * GiB
    # a container with its own cgroup namespace sees its folder as the root
    _cgroup_tree(v2, {"memory.max": "1073741824\n", "ns": "0::/\n"})
    assert cgroup_memory_limit(str(v2), str(v2 / "ns")) == GiB
    # cgroup v1 (and hybrid): the memory controller's limit_in_bytes, "no limit" being a huge number
    v1 = tmp_path / "v1"
    _cgroup_tree(v1, {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                      "memory/slurm/job_7/memory.limit_in_bytes": "4294967296\n",
                      "self": "4:memory:/slurm/job_7\n1:cpu:/\n0::/\n"})
    assert cgroup_memory_limit(str(v1), str(v1 / "self")) == 4 * GiB
    _cgroup_tree(v1, {"free": "4:memory:/\n0::/\n"})
    assert cgroup_memory_limit(str(v1), str(v1 / "free")) is None
    assert cgroup_memory_limit(str(v1), str(tmp_path / "absent")) is None

    assert default_memory_budget(cgroup_limit=None, physical=64 * GiB) == 2 * GiB
    assert default_memory_budget(cgroup_limit=8 * GiB, physical=64 * GiB) == 2 * GiB  # the manifest's limit
    assert default_memory_budget(cgroup_limit=2 * GiB, physical=64 * GiB) == GiB
    assert default_memory_budget(cgroup_limit=None, physical=4 * GiB) == GiB
    assert default_memory_budget(cgroup_limit=256 * 2**20, physical=64 * GiB) == 256 * 2**20  # the least it takes


def test_every_setting_of_the_config_file_has_a_flag_and_each_flag_reaches_the_settings(tmp_path, monkeypatch):
    from collector.settings import CONFIG_KEYS
    from fleetscope.cli import build_parser, collector_settings

    parser = build_parser()
    collector = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "collector")[1]
    flags = {opt for action in collector._actions for opt in action.option_strings}
    missing = sorted(f"--{key.replace('_', '-')}" for key in CONFIG_KEYS if f"--{key.replace('_', '-')}" not in flags)
    assert not missing, f"config keys with no flag: {missing}"

    monkeypatch.setenv("FLEETSCOPE_INGEST_TOKEN", "i")
    monkeypatch.setenv("FLEETSCOPE_READ_TOKEN", "r")
    given = {"--data-dir": str(tmp_path / "d"), "--cluster": "west", "--memory-budget": "1GiB", "--window": "2h",
             "--raw-window": "3m", "--raw-steps": "64", "--retention": "7d", "--retention-bytes": "10GiB",
             "--checkpoint-interval": "45s", "--analysis-interval": "2s", "--maintenance-interval": "10m",
             "--max-points": "250", "--max-body-bytes": "8MiB", "--max-future-skew": "1m", "--max-step-jump": "99",
             "--metrics-max-jobs": "7", "--metrics-max-services": "8", "--metrics-max-ranks": "9",
             "--straggler-page-share": "0.1", "--ingest-processes": "0", "--listen": "127.0.0.1:9999"}
    config = tmp_path / "c.toml"  # the file says otherwise: the flags win
    config.write_text('[collector]\nraw_steps = 500\nmax_points = 5\nanalysis_interval = "1m"\n')
    argv = ["collector", "--config", str(config), *(x for kv in given.items() for x in kv)]
    settings, listen = collector_settings(parser.parse_args(argv))
    assert listen == "127.0.0.1:9999"
    assert (settings.data_dir, settings.cluster, settings.memory_budget, settings.window_s, settings.raw_window_s,
            settings.raw_steps, settings.retention_s, settings.retention_bytes, settings.checkpoint_interval_s,
            settings.analysis_interval_s, settings.maintenance_interval_s, settings.max_points, settings.max_body_bytes,
            settings.max_future_skew_s, settings.max_step_jump, settings.metrics_max_jobs, settings.metrics_max_services,
            settings.metrics_max_ranks, settings.straggler_page_share, settings.ingest_processes) == (
        tmp_path / "d", "west", GiB, 7200.0, 180.0, 64, 7 * 86400.0, 10 * GiB, 45.0, 2.0, 600.0, 250, 8 * 2**20,
        60.0, 99, 7, 8, 9, 0.1, 0)
    with pytest.raises(ValueError, match="--raw-steps must be positive"):
        collector_settings(parser.parse_args(["collector", "--raw-steps", "0"]))
    with pytest.raises(ValueError, match="--max-points"):
        collector_settings(parser.parse_args(["collector", "--max-points", "many"]))
