"""Retention of the warm tier across kinds filed an hour a folder and a day a folder (issue #10:
retention never deletes rows that are newer than rows it keeps).

Hour rollups (gpus_1h, hosts_1h) are filed a day a folder (`date=D/hour=00`): retention must date such
a folder by its day's last hour, not by its name, or it drops up to 23 hours of rollups newer than
raw rows it keeps.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from collector import partitions
from collector.rollups import ALL_SCHEMAS

DAY0 = datetime(2024, 3, 1, tzinfo=timezone.utc).timestamp()
DAYS = 4
HOUR_KINDS = ("gpus", "gpus_1m", "hosts_1m")  # filed an hour a folder
DAY_KINDS = ("gpus_1h", "hosts_1h")  # filed a day a folder
KINDS = (*HOUR_KINDS, *DAY_KINDS)
EVERY = {"gpus": 600, "gpus_1m": 1200, "hosts_1m": 1800, "gpus_1h": 3600, "hosts_1h": 3600}  # seconds between rows
CHECKPOINT_S = 6 * 3600
COMMITTED = 10**6


def frame(kind: str, ts: list[float]) -> pl.DataFrame:
    schema = ALL_SCHEMAS[kind]
    return pl.DataFrame({"ts": ts}, schema={"ts": pl.Float64}).with_columns(
        pl.lit("n1").cast(schema["node"]).alias("node"),
        *(pl.lit(None, dtype=dtype).alias(name) for name, dtype in schema.items() if name not in ("ts", "node")),
    )


def write_history(root: Path) -> None:
    """DAYS days of every kind, written by the checkpoint writer every six hours (so a day folder holds
    four files, each hour folder one)."""
    for n, start in enumerate(range(int(DAY0), int(DAY0) + DAYS * 86400, CHECKPOINT_S), start=1):
        for kind in KINDS:
            offset = 0 if kind in DAY_KINDS else 7  # rollups are dated at the start of their hour
            ts = [float(t + offset) for t in range(start, start + CHECKPOINT_S, EVERY[kind])]
            partitions.write_checkpoint_parts(root, kind, frame(kind, ts), n, n)


def rows(root: Path) -> pl.DataFrame:
    """Every live row on disk, read back through the store's own scan: kind, ts."""
    out = []
    for kind in KINDS:
        lf = partitions.scan(root, kind, COMMITTED)
        if lf is not None:
            out.append(lf.select(pl.lit(kind).alias("kind"), "ts").collect())
    return pl.concat(out) if out else pl.DataFrame(schema={"kind": pl.String, "ts": pl.Float64})


def as_of(kind: str, ts: float) -> float:
    """The last hour a row's folder can hold: its hour, or its day's last hour for a day folder."""
    span = partitions.FOLDER_SPAN.get(kind, 3600)
    return (ts // span + 1) * span - 3600


def bytes_by_end(root: Path) -> dict[float, int]:
    """Bytes on disk by the end of each folder's span (an hour folder's hour, a day folder's day)."""
    out: dict[float, int] = {}
    for kind in KINDS:
        for f in (root / f"kind={kind}").glob("date=*/hour=*/*.parquet"):
            end = as_of(kind, partitions.hour_start(f"{f.parent.parent.name}/{f.parent.name}")) + 3600
            out[end] = out.get(end, 0) + f.stat().st_size
    return out


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> tuple[Path, pl.DataFrame]:
    root = tmp_path_factory.mktemp("history")
    write_history(root)
    before = rows(root)
    assert before.height > 0 and sorted(set(before["kind"])) == sorted(KINDS)
    assert {p.parent.name for p in (root / "kind=gpus_1h").glob("date=*/hour=*/*.parquet")} == {"hour=00"}
    return root, before


def copy(history, tmp_path: Path) -> tuple[Path, pl.DataFrame]:
    root, before = history
    shutil.copytree(root, tmp_path / "data")
    return tmp_path / "data", before


def check_nothing_newer_dropped(before: pl.DataFrame, after: pl.DataFrame) -> pl.DataFrame:
    """The guarantee enforce_retention's docstring gives; returns the rows dropped."""
    key = ["kind", "ts"]
    assert after.height == after.unique(key).height
    dropped = before.join(after, on=key, how="anti")
    assert after.join(before, on=key, how="anti").height == 0  # nothing appeared
    if dropped.height == 0 or after.height == 0:
        return dropped
    # Rows of hour folders: no row of ANY kind newer than the oldest one kept is dropped.
    oldest_hour_row = after.filter(pl.col("kind").is_in(HOUR_KINDS))["ts"].min()
    newer = dropped.filter(pl.col("ts") > oldest_hour_row)
    assert newer.height == 0, f"dropped rows newer than a kept row at {oldest_hour_row}:\n{newer}"
    # Every kind keeps a suffix of its own history.
    for kind in KINDS:
        kept = after.filter(pl.col("kind") == kind)["ts"]
        if kept.len():
            assert dropped.filter((pl.col("kind") == kind) & (pl.col("ts") > kept.min())).height == 0, kind
    # Folder by folder, dated by the end of its span: everything dropped is older than everything kept.
    dropped_as_of = max(as_of(k, t) for k, t in dropped.iter_rows())
    kept_as_of = min(as_of(k, t) for k, t in after.iter_rows())
    assert dropped_as_of < kept_as_of
    return dropped


def test_retention_by_age_keeps_every_row_newer_than_the_oldest_it_keeps(history, tmp_path):
    root, before = copy(history, tmp_path)
    cutoff = DAY0 + 86400 + 10.5 * 3600  # day 1, 10:30
    now = DAY0 + DAYS * 86400
    dropped_hours = partitions.enforce_retention(root, KINDS, now - cutoff, None, now=now)
    after = rows(root)
    dropped = check_nothing_newer_dropped(before, after)
    # retention did its work: every row of an hour folder older than the cutoff's hour is gone, and so is
    # day 0's day folder; nothing of an hour or a day still open at the cutoff went
    assert dropped["ts"].max() < cutoff
    hourly = after.filter(pl.col("kind").is_in(HOUR_KINDS))
    assert hourly["ts"].min() == DAY0 + 86400 + 10 * 3600 + 7
    for kind in DAY_KINDS:  # day 1 kept whole, 24 rows: its last hour is not due
        kept = after.filter(pl.col("kind") == kind)["ts"]
        assert kept.min() == DAY0 + 86400 and kept.len() == 24 * (DAYS - 1)
    assert before.filter(pl.col("ts") >= DAY0 + 86400 + 10 * 3600).join(after, on=["kind", "ts"], how="anti").height == 0
    assert dropped_hours[0] == "date=2024-03-01/hour=00" and dropped_hours[-1] == "date=2024-03-02/hour=09"
    assert not (root / "kind=gpus_1h" / "date=2024-03-01").exists() and (root / "kind=gpus_1h" / "date=2024-03-02").exists()


def test_retention_by_age_drops_a_day_folder_once_its_last_hour_is_past(history, tmp_path):
    root, before = copy(history, tmp_path)
    now = DAY0 + DAYS * 86400
    for cutoff, kept_from in ((DAY0 + 2 * 86400 - 1, DAY0 + 86400), (DAY0 + 2 * 86400, DAY0 + 2 * 86400)):
        partitions.enforce_retention(root, KINDS, now - cutoff, None, now=now)
        after = rows(root)
        check_nothing_newer_dropped(before, after)
        assert after.filter(pl.col("kind") == "gpus_1h")["ts"].min() == kept_from


@pytest.mark.parametrize("share", [0.15, 0.3, 0.45, 0.5, 0.62, 0.8, 0.95])
def test_retention_by_size_keeps_every_row_newer_than_the_oldest_it_keeps(history, tmp_path, share):
    root, before = copy(history, tmp_path)
    by_end = bytes_by_end(root)
    total = sum(by_end.values())
    max_bytes = int(total * share)
    partitions.enforce_retention(root, KINDS, None, max_bytes, now=DAY0 + DAYS * 86400)
    left = sum(partitions.disk_bytes(root, KINDS).values())
    assert left <= max_bytes
    after = rows(root)
    dropped = check_nothing_newer_dropped(before, after)
    assert dropped.height > 0
    # and no more than it had to: the folders that end with the newest dropped one (they go together)
    # back would be over the bound
    gone = sorted(set(by_end) - set(bytes_by_end(root)))
    assert gone == sorted(by_end)[:len(gone)]
    assert left + by_end[gone[-1]] > max_bytes


def test_retention_by_size_drops_the_oldest_end_first_across_kinds(history, tmp_path):
    """Folders go in order of the end of their span: day 0's day folder after day 0's 23:00 hour
    folders, at once with them, and before any hour of day 1."""
    root, before = copy(history, tmp_path)
    sizes = partitions.disk_bytes(root, KINDS)
    total = sum(sizes.values())
    first_day_hourly = sum(f.stat().st_size for k in HOUR_KINDS
                           for f in (root / f"kind={k}" / "date=2024-03-01").glob("hour=*/*.parquet"))
    # just over the bound once day 0's hour folders but its last are gone: its last hour still has to go
    max_bytes = total - first_day_hourly + 1
    dropped_hours = partitions.enforce_retention(root, KINDS, None, max_bytes, now=DAY0 + DAYS * 86400)
    after = rows(root)
    check_nothing_newer_dropped(before, after)
    assert dropped_hours == [f"date=2024-03-01/hour={h:02d}" for h in range(24)]
    assert after["ts"].min() >= DAY0 + 86400  # day 0 gone, every kind of it; day 1 whole
    assert before.filter(pl.col("ts") >= DAY0 + 86400).height == after.height
