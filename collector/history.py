"""Reads over any time range: samples from the hot tier and, for older times, the warm tier (lazy
Parquet scans with the time and key filters pushed down), and the reliability record of a GPU or a
node built from them (what an operator reads before an RMA or a cordon)."""

from __future__ import annotations

import json
import threading
import time

import msgspec
import polars as pl

from collector import partitions
from collector.rollups import GPU_SAMPLES, HOST_SAMPLES
from collector.snapshots import JsonSnapshot
from collector.store import Store

THROTTLE_REASONS = {"thermal_slowdown": "thermal_share", "power_cap": "power_cap_share", "hw_slowdown": "hw_slowdown_share"}


class GpuNodes:
    """Which nodes each GPU has been seen on, and when last, for as long as history is kept: the warm tier's files
    are sorted by node, so a GPU's history scan that names its node skips every other node's row groups. The hot
    tier knows the nodes of the GPUs seen within its window; a GPU that went quiet before (pulled for an RMA, a
    node drained for a week) is the one an operator looks up, and without its node a month's scan reads every
    row group of the fleet. Kept up by the analysis pass (update, off the ingest path), snapshotted with
    checkpoints (the store's `persisted`)."""

    def __init__(self, retention_s: float | None = None) -> None:
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, float]] = {}  # uuid -> {node: last seen ts}; inner dicts replaced, not changed

    def update(self, latest: pl.DataFrame) -> None:
        """The hot tier's newest frame of each GPU (uuid, node, ts)."""
        if latest.height == 0:
            return
        rows = latest.select(pl.col("uuid").cast(pl.String), pl.col("node").cast(pl.String), "ts").rows()
        with self._lock:
            seen = self._seen
            for uuid, node, ts in rows:
                if uuid is None or node is None:
                    continue
                nodes = seen.get(uuid)
                if nodes is None:
                    seen[uuid] = {node: ts}
                elif nodes.get(node, -1.0) < ts:
                    seen[uuid] = {**nodes, node: ts}

    def nodes_of(self, uuids: list[str]) -> list[str] | None:
        """Every node the GPUs were seen on; None when one of them is not known (its scan must read every node)."""
        out: set[str] = set()
        with self._lock:
            for uuid in uuids:
                nodes = self._seen.get(uuid)
                if nodes is None:
                    return None
                out.update(nodes)
        return sorted(out)

    def snapshot(self) -> JsonSnapshot:
        cutoff = time.time() - self.retention_s if self.retention_s is not None else None
        with self._lock:
            if cutoff is not None:
                for uuid in [u for u, nodes in self._seen.items() if max(nodes.values()) < cutoff]:
                    del self._seen[uuid]
            copy = self._seen.copy()
        return JsonSnapshot(lambda: copy)

    def restore(self, data: bytes | JsonSnapshot) -> None:
        saved = json.loads(bytes(data))
        with self._lock:
            self._seen = {uuid: {node: float(ts) for node, ts in nodes.items()} for uuid, nodes in saved.items()}


def _gpu_nodes(store: Store, uuids: list) -> list[str]:
    """The nodes to narrow a GPU history scan to: where the hot tier saw the GPUs, else where the GPU directory
    (GpuNodes, when the store keeps one) last saw them; [] when one of them is known to neither (no narrowing)."""
    latest = store.hot.latest("gpus")
    found = latest.filter(pl.col("uuid").is_in(uuids)).select(pl.col("uuid").cast(pl.String), pl.col("node").cast(pl.String))
    nodes = set(found["node"].to_list())
    missing = sorted(set(uuids) - set(found["uuid"].to_list()))
    if missing:
        directory = store.persisted.get("gpu_nodes")
        more = directory.nodes_of(missing) if isinstance(directory, GpuNodes) else None
        if more is None:
            return []
        nodes.update(more)
    return sorted(nodes)


def samples(store: Store, kind: str, since: float, until: float, keys: tuple[str, list] | None = None,
            max_points: int | None = None) -> pl.DataFrame:
    """GPU ("gpus") or host ("hosts") samples over [since, until], optionally of some GPUs or nodes only:
    the hot tier from when it is complete, the warm tier's rollups before that: hourly ones when the
    range is so long that `max_points` points per series are an hour or more apart, else per minute.
    Each row says the span of time it summarises (`span_s`: 0 for a raw frame)."""
    schema = GPU_SAMPLES if kind == "gpus" else HOST_SAMPLES
    hot_from = store.hot.complete_since(kind)
    parts = []
    if hot_from is not None and since < hot_from:
        # Hour rollups for whole hours when the points are an hour apart or more; minute rollups up to
        # where the hot tier takes over (the open hour is not rolled up yet).
        hourly = max_points is not None and (until - since) / max_points >= 3600
        edge = hot_from // 3600 * 3600 if hourly else since
        tiers = [(f"{kind}_1h", 3600.0, since, edge), (f"{kind}_1m", 60.0, max(since, edge), hot_from)] if hourly \
            else [(f"{kind}_1m", 60.0, since, hot_from)]
        committed = store.committed_segment()
        nodes = _gpu_nodes(store, list(keys[1])) if keys is not None and keys[0] == "uuid" else []
        for tier, span, lo, hi in tiers:
            if lo >= hi:
                continue
            disk = partitions.scan(store.data_dir, tier, committed, lo - span, min(until, hi))
            if disk is None:
                continue
            if keys is not None:
                disk = disk.filter(pl.col(keys[0]).is_in(keys[1]))
                if keys[0] == "uuid" and nodes:  # files are sorted by node: let the scan skip the others
                    disk = disk.filter(pl.col("node").is_in(nodes))
            disk = disk.filter((pl.col("ts") + span > lo) & (pl.col("ts") < hi)).select(list(schema)).cast(schema)  # type: ignore[arg-type]
            parts.append(disk.collect().with_columns(pl.lit(span).alias("span_s")))
    start = since if hot_from is None else max(since, hot_from)
    if start <= until:
        parts.append(store.hot.samples(kind, start, until, keys))
    if not parts:
        return pl.DataFrame(schema={**schema, "span_s": pl.Float64})
    return pl.concat(parts, how="vertical").sort("ts")


def _covered_seconds(frame: pl.DataFrame, key: str) -> pl.Expr:
    """Seconds each sample stands for: until the next sample of its key, and at most its span - a raw
    frame a minute (a longer gap is an agent that was not running, which says nothing about the GPU), a
    rollup its minute or hour, in proportion to its samples against a full one of the same span (the
    first hour of a GPU is seldom full). The last sample counts like the typical one before it."""
    gap = (pl.col("ts").shift(-1).over(key) - pl.col("ts"))
    typical = gap.median().over(key)
    if "span_s" in frame.columns:
        span = pl.col("span_s").fill_null(0.0)
        full = pl.col("samples").max().over(key, "span_s")
        cap = pl.when(span > 0).then(span * pl.min_horizontal(pl.lit(1.0), pl.col("samples") / full)).otherwise(60.0)
    else:
        cap = pl.lit(60.0)
    return pl.min_horizontal(gap.fill_null(typical).fill_null(0.0), cap).alias("covered_s")


def _counter_increase(values: list) -> float:
    values = [v for v in values if v is not None]
    # Counters only grow; a drop is a restart of the agent, after which its whole value is new.
    return float(sum(cur - prev if cur >= prev else cur for prev, cur in zip(values, values[1:])))


def _xids_by_code(texts: list, from_zero: bool) -> dict[str, int]:
    """Increases of each XID code's counter over the rows (JSON objects code -> count since the agent started);
    `from_zero`: the first row's counts are new too (its agent started within the range)."""
    series: dict[str, list] = {}
    previous: object = ()
    decoded = []
    for text in texts:  # null: no XID counted (the agent sends none while all are 0)
        if text == previous:
            continue
        previous = text
        decoded.append(msgspec.json.decode(text) if text is not None else {})
    for i, counts in enumerate(decoded):
        for code in counts:
            series.setdefault(code, [0] * i)
        for code, values in series.items():
            values.append(counts.get(code, 0))
    first = decoded[0] if decoded else {}
    out = {}
    for code, values in series.items():
        # Counted before the range started is not in it: start from the first row's value.
        increase = _counter_increase(values) if code in first and not from_zero else _counter_increase([0, *values])
        if increase > 0:
            out[code] = int(increase)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def gpu_reliability(gpu: pl.DataFrame, since: float | None = None) -> list[dict]:
    """Per GPU in the samples: XIDs by code, ECC errors, row remapping, throttle and unhealthy time.
    XIDs are counted by the agent since it started: a GPU first seen well after `since` (a new agent, a
    new GPU) has all of its first sample's XIDs in the range."""
    if gpu.height == 0:
        return []
    gpu = gpu.sort("uuid", "ts").with_columns(_covered_seconds(gpu, "uuid"))
    out = []
    for (uuid,), rows in gpu.group_by("uuid", maintain_order=True):
        covered = rows["covered_s"]
        from_zero = since is not None and float(rows["ts"][0]) > since + 300
        xid_totals = rows["xid_total"].to_list()
        record = {
            "uuid": str(uuid), "node": str(rows["node"][-1]), "index": int(rows["index"][-1]),
            "from_ts": float(rows["ts"][0]), "to_ts": float(rows["ts"][-1]),
            "observed_seconds": round(float(covered.sum()), 1),
            "xids_by_code": _xids_by_code(rows["xid_counts"].to_list(), from_zero),
            "xids_total": int(_counter_increase([0, *xid_totals] if from_zero else xid_totals)),
            "ecc_corrected": int(_counter_increase(rows["ecc_corrected_total"].to_list())),
            "ecc_uncorrected": int(_counter_increase(rows["ecc_uncorrected_total"].to_list())),
            "row_remap_pending_seen": bool(rows["remap_pending"].any()),
            "row_remap_failure_seen": bool(rows["remap_failure"].any()),
            "throttle_seconds": {reason: round(float((rows[col].fill_null(0) * covered).sum()), 1)
                                 for reason, col in THROTTLE_REASONS.items()},
            "unhealthy_seconds": round(float((rows["unhealthy_share"].fill_null(0) * covered).sum()), 1),
            "degraded_seconds": round(float((rows["degraded_share"].fill_null(0) * covered).sum()), 1),
            "lost_seconds": round(float(((1 - rows["up_ratio"].fill_null(1)) * covered).sum()), 1),
            "health_reasons_seen": sorted({str(r) for rs in rows["health_reasons"].drop_nulls().to_list() for r in rs}),
        }
        out.append(record)
    return out

