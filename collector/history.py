"""Reads over any time range: samples from the hot tier and, for older times, the warm tier (lazy
Parquet scans with the time and key filters pushed down), and the reliability record of a GPU or a
node built from them (what an operator reads before an RMA or a cordon)."""

from __future__ import annotations

import json
import threading
import time

import polars as pl

from collector import partitions
from collector.rollups import (COUNTERS, GPU_SAMPLES, GPU_SPAN, HOST_SAMPLES, NEW_ROW, counter_aggs, counter_increase,
                               counts_increase, decode_counts, span_inputs, with_counter_steps, with_xids_within)
from collector.snapshots import JsonSnapshot
from collector.store import Store

THROTTLE_REASONS = {"thermal_slowdown": "thermal_share", "power_cap": "power_cap_share", "hw_slowdown": "hw_slowdown_share"}


# A GPU's last-seen time on a node is moved on at most this often: it only decides when retention forgets the pair,
# and the analysis pass sees every GPU of the fleet every few seconds (a new dict per GPU each pass otherwise).
SEEN_PRECISION_S = 3600.0


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
                elif nodes.get(node, -SEEN_PRECISION_S) <= ts - SEEN_PRECISION_S:
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
    Each row says the span of time it summarises (`span_s`: 0 for a raw frame).
    Read hourly, a GPU's first hour also has the first minute rollup of that hour, dated at the hour's start
    (rows of the same time come shorter span first), where the hour's rollup was written before rollups kept
    their counters' first value and increase within (collector.rollups.GPU_SPAN): an hour rollup that holds
    its counters' last values only would, as the first row of a range, make the counts of its whole hour (XIDs,
    ECC errors) the range's starting point and leave them out. The minute row is that starting point; it stands
    for no time of its own in the reliability record (gpu_reliability), and a series rolls it into its first
    bucket."""
    schema = GPU_SAMPLES if kind == "gpus" else HOST_SAMPLES
    hot_from = store.hot.complete_since(kind)
    parts = []
    if hot_from is not None and since < hot_from:
        # Hour rollups for whole hours when the points are an hour apart or more; minute rollups up to
        # where the hot tier takes over (the open hour is not rolled up yet).
        hourly = max_points is not None and (until - since) / max_points >= 3600
        edge = hot_from // 3600 * 3600 if hourly else since
        first_hour = since // 3600 * 3600
        tiers = [(f"{kind}_1h", 3600.0, since, edge), (f"{kind}_1m", 60.0, max(since, edge), hot_from)] if hourly \
            else [(f"{kind}_1m", 60.0, since, hot_from)]
        starting_point = (f"{kind}_1m", 60.0, first_hour, first_hour + 3600)  # the counters' (see above)
        if hourly and kind == "gpus" and since < edge:
            tiers.append(starting_point)
        committed = store.committed_segment()
        nodes = _gpu_nodes(store, list(keys[1])) if keys is not None and keys[0] == "uuid" else []
        hours = None
        for tier, span, lo, hi in tiers:
            if lo >= hi:
                continue
            disk = _scan(store, tier, committed, lo - span, min(until, hi))
            if disk is None:
                continue
            if keys is not None:
                disk = disk.filter(pl.col(keys[0]).is_in(keys[1]))
                if keys[0] == "uuid" and nodes:  # files are sorted by node: let the scan skip the others
                    disk = disk.filter(pl.col("node").is_in(nodes))
            disk = disk.filter((pl.col("ts") + span > lo) & (pl.col("ts") < hi))
            names = set(disk.collect_schema().names())  # columns written since files of the range were: null
            disk = disk.select(pl.col(c) if c in names else pl.lit(None, t).alias(c) for c, t in schema.items())
            rows = disk.cast(schema).collect().with_columns(pl.lit(span).alias("span_s"))
            if (tier, span, lo, hi) == starting_point:  # each GPU's first minute of the hour, dated at its start
                rows = rows.sort("ts").unique("uuid", keep="first").with_columns(pl.lit(first_hour).alias("ts"))
                if hours is not None:  # not where the hour's rollup keeps its counters' first value and increase
                    rows = rows.join(hours.filter((pl.col("ts") == first_hour) & NEW_ROW).select("uuid"), on="uuid",
                                     how="anti")
            elif span == 3600.0 and kind == "gpus":
                hours = rows
            parts.append(rows)
    start = since if hot_from is None else max(since, hot_from)
    if start <= until:
        hot = store.hot.samples(kind, start, until, keys)
        if parts and hot_from is not None:
            # The rollup of the minute hot_from falls in overlaps the hot range and is in the warm tier too (ts <
            # hot_from) until the hot tier's next pass trims it (a pass that rolled up minutes older than its window,
            # after a burst of late frames or a replay, keeps them until then): read it once, from the warm tier.
            early = hot.filter(pl.col("ts") < hot_from)
            if early.height:
                key = "uuid" if kind == "gpus" else "node"
                warm = pl.concat([p.select(pl.col(key).cast(pl.String), "ts") for p in parts])
                early = early.with_columns(pl.col(key).cast(pl.String).alias("_key")).join(
                    warm.rename({key: "_key"}), on=["_key", "ts"], how="anti").drop("_key")
                hot = pl.concat([early, hot.filter(pl.col("ts") >= hot_from)], how="vertical")
        parts.append(hot)
    if not parts:
        return pl.DataFrame(schema={**schema, "span_s": pl.Float64})
    return pl.concat(parts, how="vertical").sort("ts", "span_s")


def _scan(store: Store, tier: str, committed: int, since: float, until: float) -> pl.LazyFrame | None:
    """A tier's rows over [since, until] (partitions.scan). A scan of several files takes its columns from the
    first and ignores any other's more: the GPU rollups' are listed with a file that has their span columns first
    (of the newest written), so that files written before them (older) do not hide them in the newer files."""
    files = partitions.live_parts(store.data_dir, tier, committed)
    width = partitions.FOLDER_SPAN.get(tier, 3600)
    files = [p for p in files if since - width < partitions.hour_start(p.hour) <= until]
    if tier.startswith("gpus_") and len(files) > 1:
        files.sort(key=lambda p: p.hi, reverse=True)
        for i, p in enumerate(files[:4]):
            try:
                if "xid_total_within" in pl.read_parquet_schema(p.path):
                    files.insert(0, files.pop(i))
                    break
            except (OSError, pl.exceptions.PolarsError):  # deleted under us (compacted): the scan skips it too
                continue
    return partitions.scan(store.data_dir, tier, committed, since, until, files=files)


def _covered_seconds(frame: pl.DataFrame, key: str) -> pl.Expr:
    """Seconds each sample stands for: until the next sample of its key, and at most its span - a raw
    frame a minute (a longer gap is an agent that was not running, which says nothing about the GPU), a
    rollup its minute or hour, in proportion to its samples against a full one of the same span (the
    first hour of a GPU is seldom full). The last sample counts like the typical one before it of its span
    (the last raw frame after hours of minute rollups is a sample period, not a minute)."""
    gap = (pl.col("ts").shift(-1).over(key) - pl.col("ts"))
    typical = gap.median().over(key)
    if "span_s" in frame.columns:
        span = pl.col("span_s").fill_null(0.0)
        typical = gap.median().over(key, span).fill_null(typical)
        full = pl.col("samples").max().over(key, "span_s")
        cap = pl.when(span > 0).then(span * pl.min_horizontal(pl.lit(1.0), pl.col("samples") / full)).otherwise(60.0)
    else:
        cap = pl.lit(60.0)
    return pl.min_horizontal(gap.fill_null(typical).fill_null(0.0), cap).alias("covered_s")


_SHARES = ("up_ratio", "thermal_share", "power_cap_share", "hw_slowdown_share", "unhealthy_share", "degraded_share")
_RECORD_COLUMNS = ("ts", "uuid", "node", "index", "samples", *_SHARES, "health_reasons", "xid_total", "xid_counts",
                   "ecc_corrected_total", "ecc_uncorrected_total", "remap_pending", "remap_failure", *GPU_SPAN)
# Rows of the same GPU, time and span whose order is not known (see _one_row_per_time): in the order no counter
# drops between them where there is one (a counter only grows until its source restarts).
_VALUE_ORDER = [c for counter in ("xid_total", "ecc_uncorrected_total", "ecc_corrected_total")
                for c in (f"{counter}_first", counter)]


def _one_row_per_time(gpu: pl.DataFrame) -> pl.DataFrame:
    """The samples with one row per GPU, time and span. A minute (or hour) whose frames reached the hot tier in
    two parts, the later after the minute was rolled up, has two rollup rows of the same time (collector.hot).
    Sorted by time they come in either order: a counter seems to drop between them (and its whole lifetime value
    counts again), and the first stands for no time (its gap to the next is 0). They are merged as a rollup
    merges: samples add up, shares are weighted by them, flags and reasons join. Their counters, where the rows
    keep their span's first value and increase within (collector.rollups.GPU_SPAN), are combined as a rollup
    combines them, the parts taken in the order in which no counter drops between them: exact unless a counter
    restarted within the minute, when which part came first is not known. Rows that keep their last values only
    take the larger value (a counter only grows within a minute; where the agent restarted within it, the larger
    is the value from before, which the next row's lower value then counts as a restart, as the parts in their
    order would)."""
    keys = ["uuid", "ts", *(["span_s"] if "span_s" in gpu.columns else [])]
    columns = [c for c in _RECORD_COLUMNS if c not in keys] + (["span_s"] if "span_s" in gpu.columns else [])
    twice = gpu.select(pl.struct(keys).is_duplicated()).to_series()
    if not twice.any():
        return gpu
    weight = pl.col("samples").fill_null(1)

    def weighted(c: str) -> pl.Expr:
        w = pl.when(pl.col(c).is_not_null()).then(weight).sum()
        return pl.when(w > 0).then((pl.col(c) * weight).sum() / w).alias(c)

    common = [pl.col("node").last(), pl.col("index").last(), weight.sum().alias("samples"),
              *(weighted(c) for c in _SHARES),
              pl.col("health_reasons").list.explode(keep_nulls=False, empty_as_null=False).unique(),
              pl.col("remap_pending").max(), pl.col("remap_failure").max()]
    order = [*dict.fromkeys([*keys, *columns])]
    dup = gpu.filter(twice).with_columns(NEW_ROW.all().over(keys).alias("_new"))
    merged = []
    spans = span_inputs(dup.filter(pl.col("_new")).drop("_new"))
    if spans.height:
        ordered = with_counter_steps(spans.sort([pl.col("uuid").to_physical(), *keys[1:], *_VALUE_ORDER],
                                                nulls_last=False, maintain_order=True), keys)
        combined = ordered.group_by(keys, maintain_order=True).agg(*common, *counter_aggs())
        merged.append(with_xids_within(ordered, keys, combined).select(order))
    lasts = dup.filter(~pl.col("_new"))
    if lasts.height:
        merged.append(lasts.group_by(keys).agg(
            *common, pl.col("xid_counts").sort_by(pl.col("xid_total").fill_null(-1)).last(), pl.col("xid_total").max(),
            pl.col("ecc_corrected_total").max(), pl.col("ecc_uncorrected_total").max(),
            *(pl.lit(None, t).alias(c) for c, t in GPU_SPAN.items()),
        ).select(order))
    kept = gpu.filter(~twice).select(order)
    return pl.concat([kept, *(m.cast(dict(kept.schema)) for m in merged)], how="vertical")  # type: ignore[arg-type]


def _when(first: float | None, last: float | None) -> dict | None:
    return None if first is None else {"first_ts": float(first), "last_ts": float(last)}  # type: ignore[arg-type]


def _xids_by_code(rows: pl.DataFrame, from_zero: bool) -> tuple[dict[str, int], dict[str, dict]]:
    """Increases of each XID code's counter over the rows (JSON objects code -> count since the agent started;
    null: none), and when each code was first and last counted; `from_zero`: the first row's counts are new too
    (its agent started within the range). Rows count as _increase says: a rollup that keeps its span's first
    counts and increase within by code steps to its first counts, then adds the increase within; any other row
    is a point at its counts. The counts restart as a whole (collector.rollups.counts_increase). Rows without
    counts (null xid_total too: the agent could not read them) are skipped."""
    out: dict[str, int] = {}
    when: dict[str, list] = {}
    previous: dict[str, int] | None = {} if from_zero else None
    seen: object = ()  # the counts of the row before, as text (none yet)
    columns = rows.select("ts", pl.col("xid_total").is_not_null() | pl.col("xid_counts").is_not_null(), NEW_ROW,
                          *(pl.col(c).cast(pl.String) for c in ("xid_counts_first", "xid_counts_within", "xid_counts")))
    for t, known, new, first, within, last in columns.iter_rows():
        if not known:
            continue
        if not new:
            first, within = last, None
        if within is None and first == last == seen:
            continue  # no change since the row before (most rows): nothing to count
        seen = last
        counts = decode_counts(first)
        step = counts_increase(previous, counts) if previous is not None else {}
        for part in (step, decode_counts(within)):
            for code, n in part.items():
                out[code] = out.get(code, 0) + n
                span = when.setdefault(code, [t, t])
                span[1] = t
        previous = decode_counts(last)
    order = sorted(out, key=int)
    return {c: out[c] for c in order}, {c: _when(*when[c]) for c in order}


def gpu_reliability(gpu: pl.DataFrame, since: float | None = None) -> list[dict]:
    """Per GPU in the samples: XIDs by code, ECC errors, row remapping, throttle and unhealthy time, and when
    each kind of event was first and last seen (`when`: the time of the sample that showed it - a raw frame's, or
    the start of the minute or hour a rollup summarises; null, or no entry for an XID code, when never).
    XIDs are counted by the agent since it started: a GPU first seen well after `since` (a new agent, a
    new GPU) has all of its first sample's XIDs in the range."""
    if gpu.height == 0:
        return []
    missing = [pl.lit(None, t).alias(c) for c, t in GPU_SPAN.items() if c not in gpu.columns]
    gpu = _one_row_per_time(gpu.with_columns(missing) if missing else gpu)
    gpu = gpu.sort("uuid", "ts", "span_s" if "span_s" in gpu.columns else "ts")
    gpu = gpu.with_columns(_covered_seconds(gpu, "uuid"))
    states = {"row_remap_pending": pl.col("remap_pending").fill_null(False),
              "row_remap_failure": pl.col("remap_failure").fill_null(False),
              "unhealthy": pl.col("unhealthy_share") > 0, "degraded": pl.col("degraded_share") > 0,
              "lost": pl.col("up_ratio") < 1,
              **{f"throttle.{reason}": pl.col(col) > 0 for reason, col in THROTTLE_REASONS.items()}}
    seen = {row["uuid"]: row for row in gpu.group_by("uuid").agg(
        *(pl.col("ts").filter(mask.fill_null(False)).first().alias(f"{name}:first") for name, mask in states.items()),
        *(pl.col("ts").filter(mask.fill_null(False)).last().alias(f"{name}:last") for name, mask in states.items()),
    ).with_columns(pl.col("uuid").cast(pl.String)).to_dicts()}
    out = []
    for (uuid,), rows in gpu.group_by("uuid", maintain_order=True):
        covered = rows["covered_s"]
        # A throttle share is of the samples that had clock events, and a GPU off the bus has none: it applies to
        # the part of a rollup's time the GPU was up (an hour throttled while up, 10 minutes of it off the bus: 50
        # minutes throttled, not 60).
        up_covered = rows["up_ratio"].fill_null(1) * covered
        ts = rows["ts"].to_list()
        from_zero = since is not None and ts[0] > since + 300
        xids, xid_when = _xids_by_code(rows, from_zero)
        counted = {c: counter_increase(ts, rows[c].to_list(), rows[f"{c}_first"].to_list(), rows[f"{c}_within"].to_list(),
                                from_zero=from_zero and c == "xid_total") for c in COUNTERS}
        corrected, *corrected_when = counted["ecc_corrected_total"]
        uncorrected, *uncorrected_when = counted["ecc_uncorrected_total"]
        times = seen[str(uuid)]
        when = {name: _when(times[f"{name}:first"], times[f"{name}:last"]) for name in states}
        record = {
            "uuid": str(uuid), "node": str(rows["node"][-1]), "index": int(rows["index"][-1]),
            "from_ts": float(ts[0]), "to_ts": float(ts[-1]),
            "observed_seconds": round(float(covered.sum()), 1),
            "xids_by_code": xids,
            "xids_total": int(counted["xid_total"][0]),
            "ecc_corrected": int(corrected),
            "ecc_uncorrected": int(uncorrected),
            "row_remap_pending_seen": bool(rows["remap_pending"].any()),
            "row_remap_failure_seen": bool(rows["remap_failure"].any()),
            "throttle_seconds": {reason: round(float((rows[col].fill_null(0) * up_covered).sum()), 1)
                                 for reason, col in THROTTLE_REASONS.items()},
            "unhealthy_seconds": round(float((rows["unhealthy_share"].fill_null(0) * covered).sum()), 1),
            "degraded_seconds": round(float((rows["degraded_share"].fill_null(0) * covered).sum()), 1),
            "lost_seconds": round(float(((1 - rows["up_ratio"].fill_null(1)) * covered).sum()), 1),
            "health_reasons_seen": sorted({str(r) for rs in rows["health_reasons"].drop_nulls().to_list() for r in rs}),
            "when": {
                "xids_by_code": xid_when, "ecc_corrected": _when(*corrected_when),
                "ecc_uncorrected": _when(*uncorrected_when),
                **{name: value for name, value in when.items() if not name.startswith("throttle.")},
                "throttle": {reason: when[f"throttle.{reason}"] for reason in THROTTLE_REASONS},
            },
        }
        out.append(record)
    return out
