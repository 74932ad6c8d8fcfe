"""Collector settings: defaults, the config file's [collector] table, flags; tokens are required.

Ingest tokens come one to a line (or comma-separated), each either `<token>` alone, a fleet token that
any agent may use under any name, or `<token> <identity>`, an agent token: the agent that holds it may
write only as node <identity> (parse_ingest_tokens). With `tls_client_ca` an agent may authenticate by
its client certificate instead (its identity is the certificate's common name).

Sizes may be written as bytes or with a unit ("2GiB", "500MB"), durations as seconds or with a
unit ("30d", "6h", "90s"). An unknown key is an error that names it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024**3
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _tokens(env: str) -> frozenset[str]:
    return frozenset(t.strip() for t in os.environ.get(env, "").split(",") if t.strip())


def parse_ingest_tokens(text: str, what: str = "ingest tokens") -> tuple[frozenset[str], tuple[tuple[str, str], ...]]:
    """(fleet tokens, (agent token, identity) pairs) from entries separated by new lines or commas, each
    `<token>` or `<token> <identity>`; a blank entry or one starting with # is skipped."""
    fleet: set[str] = set()
    agents: dict[str, str] = {}
    for n, entry in enumerate(re.split(r"[\n,]", text), 1):
        words = entry.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2:
            raise ValueError(f"{what}: entry {n} has {len(words)} words; write '<token>' for a fleet token or "
                             "'<token> <node>' for an agent's own token, one a line")
        token = words[0]
        if token in fleet or token in agents:
            raise ValueError(f"{what}: a token is listed twice (entry {n}); each agent needs a token of its own")
        if len(words) == 1:
            fleet.add(token)
        else:
            agents[token] = words[1]
    return frozenset(fleet), tuple(sorted(agents.items()))


def _quantity(value: object, what: str, units: dict[str, int], expected: str) -> float:
    """A number, or a number with one of `units` ("2GiB", "30d"); else an error saying what was expected."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value)) if not isinstance(value, bool) else None
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"{what}: {expected}, got {value!r}")
    return float(m.group(1)) * units[m.group(2).lower()]


def _share(value: object, what: str) -> float:
    """A number (TOML integer or float), not a string that happens to hold one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: a number, got {value!r}")
    return float(value)


def _count(value: object, what: str) -> int:
    """A whole number (TOML integer), not a float or a string that happens to hold one."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: a whole number, got {value!r}")
    return value


def parse_size(value: object, what: str) -> int:
    return int(_quantity(value, what, _SIZE_UNITS, "a size in bytes or with a unit (B, KB, MB, GB, KiB, MiB, GiB, TiB)"))


def parse_duration(value: object, what: str) -> float:
    return _quantity(value, what, _TIME_UNITS, "a duration in seconds or with a unit (s, m, h, d, w)")


def cgroup_memory_limit(cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The memory limit of this process's cgroup, the tightest of it and its ancestors (a container's, a systemd
    unit's MemoryMax, a Kubernetes pod's limits.memory); None where there is none or it cannot be read."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":  # cgroup v2: memory.max in the unified hierarchy, in each folder up to the root
            folder = Path(cgroup_root) / path.lstrip("/")
            name, v1 = "memory.max", False
        elif "memory" in controllers.split(","):  # cgroup v1's memory controller
            folder = Path(cgroup_root) / "memory" / path.lstrip("/")
            name, v1 = "memory.limit_in_bytes", True
        else:
            continue
        root = Path(cgroup_root) / ("memory" if v1 else "")
        while True:
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                text = ""  # not this folder (a namespaced path that does not exist here): its parents may say
            if text.isdigit() and int(text) < 2**60:  # v1 says "no limit" with a huge number, v2 with "max"
                limits.append(int(text))
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def default_memory_budget(cgroup_limit: int | None = None, physical: int | None = None) -> int:
    """2 GiB, or less where memory is short: a quarter of this machine's memory, and half of its cgroup's limit
    (a container's or a unit's; the tables hold about the budget at their fullest, and reads and checkpoints need
    room beside them), at least 256 MiB."""
    if physical is None:
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            physical = None
    if cgroup_limit is None:
        cgroup_limit = cgroup_memory_limit()
    budget = 2 * GiB
    if physical:
        budget = min(budget, physical // 4)
    if cgroup_limit:
        budget = min(budget, cgroup_limit // 2)
    return max(256 * 2**20, budget)


def size_polars_pool(environ: dict[str, str] | None = None, cpus: int | None = None) -> int | None:
    """Give polars' thread pool one thread fewer than this process's CPUs (at least one), leaving a core to the event
    loop and the ingest thread; an operator's own POLARS_MAX_THREADS is left as it is. Returns the size set, or None.

    Must run before polars is imported (it reads the variable once). On 2 cores that is one thread: the hot tier's
    upkeep and the analysis then take one core, not both, and acknowledgements stop waiting for them (README,
    "2 December, night": paced p99 within its goal in every run, against about three runs in four)."""
    environ = os.environ if environ is None else environ
    if environ.get("POLARS_MAX_THREADS", "").strip():
        return None
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    threads = max(1, cpus - 1)
    environ["POLARS_MAX_THREADS"] = str(threads)
    return threads


def default_retention_bytes(data_dir: Path) -> int:
    """Two fifths of the file system that holds the data folder (the WAL and the rest live there too)."""
    folder = Path(data_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    return int(shutil.disk_usage(folder).total * 0.4)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("FLEETSCOPE_DATA_DIR", ".fleetscope/collector")))
    # Fleet tokens: any agent may use one and write as any node (small, trusted setups only).
    ingest_tokens: frozenset[str] = field(default_factory=lambda: _tokens("FLEETSCOPE_INGEST_TOKEN"))
    # Agent tokens: (token, identity) pairs; the agent holding one writes only as node <identity>.
    agent_tokens: tuple[tuple[str, str], ...] = ()
    read_tokens: frozenset[str] = field(default_factory=lambda: _tokens("FLEETSCOPE_READ_TOKEN"))
    cluster: str | None = None  # labels this collector's findings and job metrics (several clusters, one store)
    max_body_bytes: int = 16 * 1024 * 1024  # the largest ingest body taken (413 past it; agents split their batches)
    memory_budget: int = field(default_factory=default_memory_budget)  # bytes the collector aims to stay within
    window_s: float = 6 * 3600.0  # the hot tier: rollups, step aggregates, requests kept in memory
    raw_window_s: float = 300.0  # raw GPU and host frames kept in memory
    raw_steps: int = 120  # raw steps kept in memory per rank
    retention_s: float | None = 30 * 86400.0  # the warm tier (Parquet) is kept this long ...
    retention_bytes: int | None = None  # ... and within this size (default: 40% of the data disk)
    checkpoint_interval_s: float = 30.0  # WAL -> Parquet
    analysis_interval_s: float = 5.0  # hot-tier upkeep, then stragglers, hangs, regressions
    # A straggler (or slow node) pages when the job's other ranks wait at least this share of each step for it;
    # below, it is a ticket (collector.findings).
    straggler_page_share: float = 0.05
    maintenance_interval_s: float = 300.0  # compaction of closed hours, retention
    max_points: int = 500  # a history query returns at most this many points per series
    fsync: bool = True  # off only in benchmarks that want to see the cost of everything else
    # Worker processes that decode ingest bodies and build their frames (collector.decoders); 0: the ingest threads do.
    # Unset, `fleetscope collector` runs one fewer than the CPUs (at most 4), and a collector built in code none.
    ingest_processes: int | None = None
    slos: tuple = ()  # collector.slo.Slo, from the config file's [[slo]] tables
    # Input bounds (collector.bounds): a record dated further ahead than this, or older than retention, is
    # refused on its own (counted, and listed in the ingest reply); so is a step number more than
    # max_step_jump above the highest step its job and rank have reported.
    max_future_skew_s: float = 600.0
    max_step_jump: int = 1_000_000
    # The collector's own /metrics exports at most this many jobs, services (one per model served) and
    # ranks (straggler scores): the most troubled, then the most recent; the rest are counted as omitted.
    metrics_max_jobs: int = 500
    metrics_max_services: int = 200
    metrics_max_ranks: int = 1000
    # HTTPS: the server's certificate chain and key (PEM); with tls_client_ca, agents may present a client
    # certificate signed by that CA and are then known by its common name. With tls_cert, plain HTTP is refused.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # A Prometheus web configuration file (fleetscope/webconfig.py): its basic_auth_users guard /metrics (Prometheus
    # scrapes with a password instead of a read token); its tls_server_config, when tls_cert is not set, becomes the
    # whole server's TLS (with tls_cert too it is refused as ambiguous).
    web_config: Path | None = None
    metrics_basic_auth: object = field(default=None, compare=False, repr=False)  # a BasicAuth, from web_config
    # Derived once from the tokens, for the check every request makes (collector/api/deps.py): the node each agent
    # token is bound to, by the token's SHA-256 (a dict lookup, not a pass over every token); every ingest token.
    agent_by_digest: dict = field(init=False, default_factory=dict, compare=False, repr=False)
    all_ingest_tokens: frozenset = field(init=False, default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "agent_by_digest", {token_digest(t): node for t, node in self.agent_tokens})
        object.__setattr__(self, "all_ingest_tokens", self.ingest_tokens | {t for t, _ in self.agent_tokens})
        if self.web_config is not None:
            self._take_web_config()
        if not self.ingest_tokens and not self.agent_tokens and self.tls_client_ca is None:
            raise ValueError("collector: no ingest token; set FLEETSCOPE_INGEST_TOKEN (comma-separated for several) or --ingest-token")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.tls_cert is None and (self.tls_key is not None or self.tls_client_ca is not None):
            raise ValueError("collector: tls_key and tls_client_ca need tls_cert (the server's certificate)")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"collector: {name} {path} is not a readable file")
        if not self.read_tokens:
            raise ValueError("collector: no read token; set FLEETSCOPE_READ_TOKEN (comma-separated for several) or --read-token")
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.retention_bytes is None:
            object.__setattr__(self, "retention_bytes", default_retention_bytes(self.data_dir))
        for name in ("memory_budget", "window_s", "raw_window_s", "raw_steps", "checkpoint_interval_s",
                     "analysis_interval_s", "maintenance_interval_s", "max_points", "max_body_bytes",
                     "max_future_skew_s", "max_step_jump", "metrics_max_jobs", "metrics_max_services", "metrics_max_ranks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"collector: {name} must be positive, got {getattr(self, name)}")
        if self.ingest_processes is not None and self.ingest_processes < 0:
            raise ValueError(f"collector: ingest_processes must be 0 or more, got {self.ingest_processes}")
        if not 0 < self.straggler_page_share <= 1:
            raise ValueError(f"collector: straggler_page_share is a share of each step, in (0, 1], got {self.straggler_page_share}")
        if self.memory_budget < 128 * 2**20:
            raise ValueError(f"collector: memory_budget of {self.memory_budget} bytes is below the 128 MiB the process itself needs")
        if self.raw_window_s > self.window_s:
            raise ValueError("collector: raw_window must not be longer than window")

    def _take_web_config(self) -> None:
        from fleetscope.webconfig import load_web_config

        web = load_web_config(self.web_config)  # WebConfigError is a ValueError naming the file and key
        object.__setattr__(self, "metrics_basic_auth", web.basic_auth())
        if web.tls is None:
            return
        if self.tls_cert is not None:
            raise ValueError(f"collector: web config {self.web_config} has tls_server_config and tls_cert is set too; "
                             "give the server's TLS one way: remove tls_server_config, or tls_cert/tls_key/tls_client_ca")
        if web.tls.client_auth_type != "NoClientCert":
            raise ValueError(f"collector: web config {self.web_config}: client certificates are configured with "
                             "tls_client_ca (mutual TLS for the agents), not client_auth_type; remove client_auth_type "
                             "and client_ca_file")
        object.__setattr__(self, "tls_cert", web.tls.cert_file)
        object.__setattr__(self, "tls_key", web.tls.key_file)


# The [collector] table: key -> (Settings field, parser).
CONFIG_KEYS = {
    "data_dir": ("data_dir", lambda v, w: Path(str(v))),
    "cluster": ("cluster", lambda v, w: str(v)),
    "memory_budget": ("memory_budget", parse_size),
    "window": ("window_s", parse_duration),
    "raw_window": ("raw_window_s", parse_duration),
    "raw_steps": ("raw_steps", lambda v, w: int(v)),
    "retention": ("retention_s", parse_duration),
    "retention_bytes": ("retention_bytes", parse_size),
    "checkpoint_interval": ("checkpoint_interval_s", parse_duration),
    "analysis_interval": ("analysis_interval_s", parse_duration),
    "maintenance_interval": ("maintenance_interval_s", parse_duration),
    "straggler_page_share": ("straggler_page_share", lambda v, w: _share(v, w)),
    "max_points": ("max_points", lambda v, w: int(v)),
    "ingest_processes": ("ingest_processes", lambda v, w: _count(v, w)),
    "max_body_bytes": ("max_body_bytes", parse_size),
    "max_future_skew": ("max_future_skew_s", parse_duration),
    "max_step_jump": ("max_step_jump", lambda v, w: _count(v, w)),
    "metrics_max_jobs": ("metrics_max_jobs", lambda v, w: _count(v, w)),
    "metrics_max_services": ("metrics_max_services", lambda v, w: _count(v, w)),
    "metrics_max_ranks": ("metrics_max_ranks", lambda v, w: _count(v, w)),
    "tls_cert": ("tls_cert", lambda v, w: Path(str(v))),
    "tls_key": ("tls_key", lambda v, w: Path(str(v))),
    "tls_client_ca": ("tls_client_ca", lambda v, w: Path(str(v))),
    "web_config": ("web_config", lambda v, w: Path(str(v))),
    "listen": ("", lambda v, w: str(v)),  # read by the command line, not a Settings field
}


def load_config(path: str | Path) -> tuple[dict[str, object], dict[str, object]]:
    """(Settings keyword arguments, other [collector] keys such as listen) from a TOML file with a
    [collector] table and [[slo]] tables. Raises ValueError naming what is wrong."""
    from collector.slo import parse_slos
    from fleetscope.secrets import load_private_toml

    data = load_private_toml(path, "collector")  # a [collector] table that holds a token must be private
    unknown = sorted(set(data) - {"collector", "slo"})
    if unknown:
        raise ValueError(f"{path}: unknown table or key(s) {', '.join(map(repr, unknown))}; expected [collector] and [[slo]]")
    table = data.get("collector", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: 'collector' must be a table ([collector])")
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) in [collector]: {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    kwargs: dict[str, object] = {}
    other: dict[str, object] = {}
    for key, value in table.items():
        name, parse = CONFIG_KEYS[key]
        try:
            parsed = parse(value, f"{path}: [collector] {key}")
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc) if str(path) in str(exc) else f"{path}: [collector] {key}: {exc}") from None
        if name:
            kwargs[name] = parsed
        else:
            other[key] = parsed
    slos = parse_slos(data.get("slo", []), path)
    if slos:
        kwargs["slos"] = tuple(slos)
    return kwargs, other

