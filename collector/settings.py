"""Collector settings: flags and environment; tokens are required, there is no open mode."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _tokens(env: str) -> frozenset[str]:
    return frozenset(t.strip() for t in os.environ.get(env, "").split(",") if t.strip())


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".fleetscope/collector")
    ingest_tokens: frozenset[str] = field(default_factory=lambda: _tokens("FLEETSCOPE_INGEST_TOKEN"))
    read_tokens: frozenset[str] = field(default_factory=lambda: _tokens("FLEETSCOPE_READ_TOKEN"))
    max_body_bytes: int = 16 * 1024 * 1024
    checkpoint_interval_s: float = 30.0  # WAL -> Parquet
    analysis_interval_s: float = 5.0  # stragglers, hangs, regressions
    maintenance_interval_s: float = 300.0  # compaction of closed hours, retention
    window_s: float = 6 * 3600.0  # how much recent data the collector keeps in memory
    retention_s: float | None = 30 * 86400.0  # Parquet kept on disk, by age
    retention_bytes: int | None = None  # ... and by total size
    fsync: bool = True
    slos: tuple = ()  # collector.slo.Slo, from the config file's [[slo]] tables  # off only in benchmarks that want to see the cost of everything else

    def __post_init__(self) -> None:
        if not self.ingest_tokens:
            raise ValueError("collector: no ingest token; set FLEETSCOPE_INGEST_TOKEN (comma-separated for several) or --ingest-token")
        if not self.read_tokens:
            raise ValueError("collector: no read token; set FLEETSCOPE_READ_TOKEN (comma-separated for several) or --read-token")
        object.__setattr__(self, "data_dir", Path(self.data_dir))
