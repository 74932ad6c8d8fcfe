"""Summaries the hot tier keeps instead of raw rows: per-step aggregates of each job, and per-minute
rollups of GPU and host frames (pure polars, no I/O).

A rollup row has the shape of a *sample*: raw frames become samples of weight 1 (`as_gpu_samples`,
`as_host_samples`) and a minute's rollup is one sample of weight `samples`, so the attribution and the
console read raw rows and rollups alike: shares are weighted means, counters keep their last value.
A GPU's counters (XIDs, ECC errors) also keep their span's first value and their increase within it
(`<counter>_first`, `<counter>_within`): they restart from 0 with the agent (a reboot after an XID 79),
and a last value alone loses what was counted before a restart within the span (see GPU_SPAN).
"""

from __future__ import annotations

import math
from typing import Callable

import msgspec
import polars as pl

from collector.tables import CAT, F32, F64, I16, I32, I64, SCHEMAS
from fleetscope.vocabulary import HEALTH_STATES, HW_SLOWDOWN_BITS, POWER_CAP_BIT, THERMAL_BITS

HEALTH = pl.Enum(list(HEALTH_STATES))

STEP_AGGS: dict[str, pl.DataType] = {
    "job": CAT, "incarnation": I32, "step": I64, "ts": F64, "end_ts": F64, "ranks": I32, "world_size": I32,
    "step_time_p50_s": F32, "step_time_p95_s": F32, "step_time_max_s": F32, "failed": I32,
    "tokens": I64, "samples": I64, "flops_per_token": F64,
}

GPU_SAMPLES: dict[str, pl.DataType] = {
    "ts": F64, "node": CAT, "index": I16, "uuid": CAT, "samples": I32, "up_ratio": F32,
    "utilization_ratio": F32, "memory_used_bytes": I64, "temperature_celsius": F32, "temperature_max_celsius": F32,
    "power_watts": F32, "power_limit_watts": F32, "sm_clock_hertz": F32,
    "busy_samples": I32, "busy_clock_ratio": F32,  # SM clock over its max while utilisation > 0.5
    "thermal_share": F32, "power_cap_share": F32, "hw_slowdown_share": F32, "clock_event_mask": I64,
    "health": HEALTH, "unhealthy_share": F32, "degraded_share": F32, "health_reasons": pl.List(CAT), "xid_total": I64,
    "xid_counts": CAT, "ecc_corrected_total": I64, "ecc_uncorrected_total": I64,
    "remap_pending": pl.Boolean, "remap_failure": pl.Boolean,
}
GPU_LAST = ("xid_total", "xid_counts", "ecc_corrected_total", "ecc_uncorrected_total")  # counters: the last value
COUNTERS = ("xid_total", "ecc_corrected_total", "ecc_uncorrected_total")
# Each counter's value at the span's first sample that had one, and its increase within the span: over its samples
# in time order, cur - prev, or cur where the counter dropped (its source restarted: the whole value is new). With
# the last value, that counts every increase at any granularity: a range's increase is, over its rows in time order,
# the step from each row's last value to the next row's first (the same rule) plus each row's increase within.
# xid_counts (JSON {code: count}) likewise: its first value, and the increase by code within the span (null when
# none); the counts restart as a whole (any code dropping is a restart, after which every count is new).
# Null in rows written before these columns were kept (read as a point at their last value), and, for a counter
# with no value in the span, its _first (its _within is 0 in every row written since: the mark of a new row).
# An increase within a span above 2**31 - 1 (no real counter) is kept as that.
GPU_SPAN: dict[str, pl.DataType] = {
    **{f"{c}_first": I64 for c in COUNTERS}, **{f"{c}_within": I32 for c in COUNTERS},
    "xid_counts_first": CAT, "xid_counts_within": CAT,
}
GPU_SAMPLES.update(GPU_SPAN)
NEW_ROW = pl.col("xid_total_within").is_not_null()  # a row that keeps its span's counters (see GPU_SPAN)

HOST_SAMPLES: dict[str, pl.DataType] = {
    "ts": F64, "node": CAT, "samples": I32, "cpu_utilization_ratio": F32, "memory_used_bytes": I64,
    "memory_total_bytes": I64, "load1": F32, "gpu_count": I16, "cluster": CAT, "rack": CAT,
    "network_errors_total": F64, "infiniband_errors_total": F64, "memory_stalled_seconds_total": F64,
    "network_receive_bytes_total": F64, "network_transmit_bytes_total": F64, "disk_read_bytes_total": F64,
    "disk_written_bytes_total": F64,
}
HOST_COUNTERS = tuple(c for c in HOST_SAMPLES if c.endswith("_total"))


STEP_KEY = ("job", "incarnation", "step")


def incarnation_of(steps: pl.DataFrame) -> pl.Expr:
    """Each step row's incarnation (collector.goodput_ledger numbers them as rows arrive; 0 for rows that
    carry none: written before incarnations were kept, or built without a store)."""
    return pl.col("incarnation").fill_null(0) if "incarnation" in steps.columns else pl.lit(0, I32).alias("incarnation")


def step_aggregates(steps: pl.DataFrame) -> pl.DataFrame:
    """One row per (job, incarnation, step): when it started and ended, how many ranks reported it, step-time
    spread. A step that a restart ran again (restored from an earlier checkpoint) has a row for each run."""
    return steps.group_by("job", incarnation_of(steps), "step").agg(
        pl.col("ts").min(),
        (pl.col("ts") + pl.col("duration_s")).max().alias("end_ts"),
        pl.len().alias("ranks"),
        pl.col("world_size").max(),
        pl.col("duration_s").median().alias("step_time_p50_s"),
        pl.col("duration_s").quantile(0.95, interpolation="linear").alias("step_time_p95_s"),
        pl.col("duration_s").max().alias("step_time_max_s"),
        pl.col("failed").sum().alias("failed"),
        pl.col("tokens").sum().alias("tokens"),
        pl.col("samples").sum().alias("samples"),
        pl.col("flops_per_token").drop_nulls().last(),
    ).cast(STEP_AGGS).select(list(STEP_AGGS))  # type: ignore[arg-type]


def merge_step_aggregates(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Upsert by (job, incarnation, step); a recomputation from fewer ranks (some already trimmed) never
    replaces one from more."""
    if new.height == 0:
        return old
    if old.height == 0:
        return new
    # Only the old rows whose key is in `new` take part in the upsert. New steps are mostly past every old one:
    # the old rows from new's lowest step on are the only candidates, so the work is O(new), where sorting the
    # whole table every analysis pass (hundreds of thousands of steps over the window) took 100-200 ms.
    keys = new.select(STEP_KEY)
    candidate = (pl.col("step") >= new.get_column("step").min()).fill_null(True)
    maybe = old.filter(candidate)
    hit = maybe.join(keys, on=list(STEP_KEY), how="semi", nulls_equal=True)
    if hit.height == 0:
        return pl.concat([old, new], how="vertical", rechunk=False)
    merged = pl.concat([hit, new]).sort("ranks", "end_ts").unique(list(STEP_KEY), keep="last", maintain_order=False)
    untouched = maybe.join(keys, on=list(STEP_KEY), how="anti", nulls_equal=True)
    return pl.concat([old.filter(~candidate), untouched, merged], how="vertical", rechunk=False)


def latest_runs(aggs: pl.DataFrame) -> pl.DataFrame:
    """Per (job, step), the aggregate of its latest incarnation: the run whose work the job kept (an earlier
    run of a step that a restart re-ran is superseded, as the step-time series and the regression see it)."""
    if aggs.height == 0 or aggs["incarnation"].n_unique() <= 1:
        return aggs
    return aggs.sort("incarnation").unique(["job", "step"], keep="last", maintain_order=False)


def _bit_share(bits: int) -> pl.Expr:
    return ((pl.col("clock_event_mask") & bits) > 0).cast(F32)


def as_gpu_samples(gpus: pl.DataFrame) -> pl.DataFrame:
    """Raw GPU frames as samples of weight 1."""
    busy = (pl.col("utilization_ratio") > 0.5) & (pl.col("sm_clock_max_hertz") > 0)
    return gpus.select(
        "ts", "node", "index", "uuid", pl.lit(1, I32).alias("samples"), pl.col("up").cast(F32).alias("up_ratio"),
        "utilization_ratio", "memory_used_bytes", "temperature_celsius",
        pl.col("temperature_celsius").alias("temperature_max_celsius"), "power_watts", "power_limit_watts",
        "sm_clock_hertz", busy.cast(I32).alias("busy_samples"),
        pl.when(busy).then(pl.col("sm_clock_hertz") / pl.col("sm_clock_max_hertz")).alias("busy_clock_ratio"),
        _bit_share(THERMAL_BITS).alias("thermal_share"), _bit_share(POWER_CAP_BIT).alias("power_cap_share"),
        _bit_share(HW_SLOWDOWN_BITS).alias("hw_slowdown_share"), "clock_event_mask", "health",
        (pl.col("health") == "unhealthy").cast(F32).alias("unhealthy_share"),
        (pl.col("health") == "degraded").cast(F32).alias("degraded_share"),
        "health_reasons", *GPU_LAST, "remap_pending", "remap_failure",
        *(pl.col(c).alias(f"{c}_first") for c in COUNTERS), *(pl.lit(0, I32).alias(f"{c}_within") for c in COUNTERS),
        pl.col("xid_counts").alias("xid_counts_first"), pl.lit(None, CAT).alias("xid_counts_within"),
    ).cast(GPU_SAMPLES)  # type: ignore[arg-type]


def _weighted(column: str) -> pl.Expr:
    weight = pl.when(pl.col(column).is_not_null()).then(pl.col("samples")).sum()
    return pl.when(weight > 0).then((pl.col(column) * pl.col("samples")).sum() / weight).alias(column)


MAX_WITHIN = 2**31 - 1


def increase(prev: int, cur: int) -> int:
    """A counter's increase from one value to the next: a drop is a restart, after which the whole value is new."""
    return cur - prev if cur >= prev else cur


def counter_increase(ts: list, lasts: list, firsts: list | None = None, withins: list | None = None,
                     from_zero: bool = False) -> tuple[int, float | None, float | None]:
    """A counter's increase over the rows, and the times of the first and last rows that showed one. Counters
    only grow; a drop is a restart of its source (the agent; the driver, for volatile ECC counts), after which its
    whole value is new. A row that keeps its span's first value and increase within (`firsts`, `withins`: a
    rollup's, GPU_SPAN) counts the step from the row before to its first value, then its
    increase within (dated at the row's time, its span's start); any other (a raw frame; a rollup written before
    they were kept, null in `withins`) is a point at its (last) value. Rows without a value are skipped.
    `from_zero`: the first row's value is new too."""
    total, first_ts, last_ts = 0, None, None
    previous = 0 if from_zero else None
    for i, (t, last) in enumerate(zip(ts, lasts)):
        if last is None:
            continue
        within = withins[i] if withins is not None else None
        first = firsts[i] if within is not None and firsts is not None and firsts[i] is not None else last
        step = increase(previous, first) if previous is not None else 0
        if step > 0 or (within or 0) > 0:
            total += step + (within or 0)
            first_ts = t if first_ts is None else first_ts
            last_ts = t
        previous = last
    return total, first_ts, last_ts


def counts_increase(prev: dict[str, int], cur: dict[str, int]) -> dict[str, int]:
    """XID counts' increase by code from one value to the next: where any code dropped the agent restarted (its
    counts restart together), and every count of `cur` is new."""
    if any(cur.get(code, 0) < n for code, n in prev.items()):
        return {code: n for code, n in cur.items() if n > 0}
    return {code: n - prev.get(code, 0) for code, n in cur.items() if n > prev.get(code, 0)}


_decoded: dict[str, dict[str, int]] = {}


def decode_counts(text: str | None) -> dict[str, int]:
    """A JSON object of XID counts ({} for null: none counted); a few distinct texts, decoded once each."""
    if text is None:
        return {}
    counts = _decoded.get(text)
    if counts is None:
        counts = {str(k): int(v) for k, v in msgspec.json.decode(text).items()}
        if len(_decoded) < 100_000:
            _decoded[text] = counts
    return counts


def encode_counts(counts: dict[str, int]) -> str | None:
    """XID counts as JSON, codes in numeric order; null when none (as the raw rows have them)."""
    kept = {code: counts[code] for code in sorted(counts, key=int) if counts[code] > 0}
    return msgspec.json.encode(kept).decode() if kept else None


def xids_known() -> pl.Expr:
    """A sample (or rollup) with XID counts: null in both columns is a GPU whose counts the agent could not read
    (an agent sends no counts while none are counted, but xid_total 0)."""
    return pl.col("xid_total").is_not_null() | pl.col("xid_counts").is_not_null()


def span_inputs(samples: pl.DataFrame) -> pl.DataFrame:
    """Samples with each counter's span columns filled in: rows written before they were kept (or frames built
    without them) are points at their last value (first = last, nothing within)."""
    missing = [pl.lit(None, t).alias(c) for c, t in GPU_SPAN.items() if c not in samples.columns]
    if missing:
        samples = samples.with_columns(missing)
    old = ~NEW_ROW
    return samples.with_columns(
        *(pl.col(f"{c}_first").fill_null(pl.col(c)) for c in COUNTERS),
        *(pl.col(f"{c}_within").fill_null(0) for c in COUNTERS),
        pl.when(old).then(pl.col("xid_counts")).otherwise(pl.col("xid_counts_first")).alias("xid_counts_first"),
        pl.when(old).then(None).otherwise(pl.col("xid_counts_within")).alias("xid_counts_within"),
    )


def with_counter_steps(ordered: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """`span_inputs` rows, sorted by `keys` and within each key in time order, with each counter's step from the
    row before of the same key (the last value it had) to the row (its first value): `_step_<counter>`, 0 for a
    key's first row with a value. Vectorised over the sorted rows (a shift within each group of a group_by took
    six times as long as the whole minute rollup)."""
    start = pl.any_horizontal(*(pl.col(k).ne_missing(pl.col(k).shift(1)) for k in keys)).fill_null(True)
    ordered = ordered.with_columns(start.cum_sum().alias("_group"))
    steps = []
    for c in COUNTERS:
        first, last = pl.col(f"{c}_first"), pl.col(c)
        prev = last.forward_fill().shift(1)  # the last value before the row (maybe another group's)
        prev_group = pl.when(last.is_not_null()).then(pl.col("_group")).forward_fill().shift(1)
        step = pl.when(first >= prev).then(first - prev).otherwise(first)
        steps.append(pl.when(prev_group.eq_missing(pl.col("_group")) & first.is_not_null()).then(step)
                     .otherwise(0).alias(f"_step_{c}"))
    return ordered.with_columns(steps).drop("_group")


def counter_aggs() -> list[pl.Expr]:
    """Aggregations (within a group_by over `with_counter_steps` rows, each group in time order) of each counter's
    first, last and within-span values, as GPU_SPAN says; XID counts' increase within is left to
    `with_xids_within`, which the column `_xids_walk` tells which groups need."""
    out: list[pl.Expr] = []
    for c in COUNTERS:
        within = pl.col(f"{c}_within").cast(I64).sum() + pl.col(f"_step_{c}").cast(I64).sum()
        out += [pl.col(c).drop_nulls().last(), pl.col(f"{c}_first").drop_nulls().first(),
                within.clip(upper_bound=MAX_WITHIN).alias(f"{c}_within")]
    known = xids_known()
    first, last, within = (pl.col(c).filter(known) for c in ("xid_counts_first", "xid_counts", "xid_counts_within"))
    out += [
        first.first().alias("xid_counts_first"), last.last().alias("xid_counts"),
        # The counts' increase within the group is other than none where a row had some, or they ever changed.
        (within.is_not_null().any() | (first.n_unique() > 1) | (last.n_unique() > 1)
         | first.first().ne_missing(last.first())).alias("_xids_walk"),
    ]
    return out


def with_xids_within(ordered: pl.DataFrame, keys: list[str], out: pl.DataFrame) -> pl.DataFrame:
    """`out` (one row per key, with `_xids_walk`) with xid_counts_within: the increase by code over the `ordered`
    rows of each key that needs it (`counter_aggs`), in their order: each row's increase within and the step from the
    row before to it."""
    walk = out.filter(pl.col("_xids_walk")).select(keys)
    out = out.drop("_xids_walk")
    if walk.height == 0:
        return out.with_columns(pl.lit(None, CAT).alias("xid_counts_within"))
    rows = ordered.filter(xids_known()).join(walk, on=keys, how="semi", maintain_order="left", nulls_equal=True)
    found: dict[str, list] = {k: [] for k in keys} | {"xid_counts_within": []}
    for key, group in rows.group_by(keys, maintain_order=True):
        total: dict[str, int] = {}
        prev = None
        for first, within, last in group.select(pl.col("xid_counts_first", "xid_counts_within", "xid_counts")
                                                .cast(pl.String)).iter_rows():
            counts = decode_counts(first)
            for part in ((counts_increase(prev, counts) if prev is not None else {}), decode_counts(within)):
                for code, n in part.items():
                    total[code] = total.get(code, 0) + n
            prev = decode_counts(last)
        for k, v in zip(keys, key):
            found[k].append(v)
        found["xid_counts_within"].append(encode_counts(total))
    walked = pl.DataFrame(found, schema={**{k: out.schema[k] for k in keys}, "xid_counts_within": pl.String})
    return out.join(walked.with_columns(pl.col("xid_counts_within").cast(CAT)), on=keys, how="left",
                    maintain_order="left", nulls_equal=True)


SLICE_ROWS = 250_000  # a rollup of more rows is done a share of its GPUs or nodes at a time (in_slices)


def in_slices(frame: pl.DataFrame, key: str, roll: Callable[[pl.DataFrame], pl.DataFrame],
              rows: int | None = None) -> pl.DataFrame:
    """`roll(frame)` for a rollup per `key` and time, sorted by time and `key` as `roll` sorts its own: over a share
    of the keys at a time when `frame` has more than `rows` rows, so that its copies (a sort and columns added:
    about twice its input) are of a share only. An
    hour of 32,768 GPUs' minute rollups took 553 MiB beside its 307 MiB input whole, 141 MiB in 8 shares.
    Each share is made one chunk first: the hot tier's rows come a frame per ingested batch, and a rollup over
    thousands of chunks took 13 times as long (20 s against 1.5 s for 1.3 M rows in 13,653 chunks)."""
    shares = -(-frame.height // (rows or SLICE_ROWS))
    if shares <= 1:
        return roll(frame.rechunk())
    share = (pl.col(key).to_physical() % shares).fill_null(0)
    return pl.concat([roll(frame.filter(share == i).rechunk()) for i in range(shares)], how="vertical").sort("ts", key)


def rollup_gpu_samples(samples: pl.DataFrame, every_s: float) -> pl.DataFrame:
    """Samples (raw or rolled up already) summarised per GPU and `every_s` seconds. Rows of the same time (a minute
    rolled up in two parts) are taken in the order they come."""
    return in_slices(samples, "uuid", lambda share: _rollup_gpu(share, every_s))


def _rollup_gpu(samples: pl.DataFrame, every_s: float) -> pl.DataFrame:
    ordered = span_inputs(samples).with_columns((pl.col("ts") // every_s * every_s).alias("bucket"))
    ordered = with_counter_steps(ordered.sort(pl.col("uuid").to_physical(), "bucket", "ts", maintain_order=True),
                                 ["uuid", "bucket"])
    rolled = (
        ordered
        .group_by("bucket", "uuid")
        .agg(
            pl.col("node").last(), pl.col("index").last(), pl.col("samples").sum(), _weighted("up_ratio"),
            _weighted("utilization_ratio"), pl.col("memory_used_bytes").max(), _weighted("temperature_celsius"),
            pl.col("temperature_max_celsius").max(), _weighted("power_watts"), pl.col("power_limit_watts").min(),
            _weighted("sm_clock_hertz"), pl.col("busy_samples").sum(),
            pl.when(pl.col("busy_samples").filter(pl.col("busy_clock_ratio").is_not_null()).sum() > 0)
            .then((pl.col("busy_clock_ratio") * pl.col("busy_samples")).sum()
                  / pl.col("busy_samples").filter(pl.col("busy_clock_ratio").is_not_null()).sum()).alias("busy_clock_ratio"),
            _weighted("thermal_share"), _weighted("power_cap_share"), _weighted("hw_slowdown_share"),
            pl.col("clock_event_mask").bitwise_or(), pl.col("health").max(),
            _weighted("unhealthy_share"), _weighted("degraded_share"),
            pl.col("health_reasons").list.explode(keep_nulls=False, empty_as_null=False).unique(),
            *counter_aggs(),
            pl.col("remap_pending").max(), pl.col("remap_failure").max(),
        )
    )
    return (
        with_xids_within(ordered, ["bucket", "uuid"], rolled)
        .with_columns(pl.col("bucket").alias("ts"),
                      pl.when(pl.col("health_reasons").list.len() > 0).then(pl.col("health_reasons")))
        .cast(GPU_SAMPLES)  # type: ignore[arg-type]
        .select(list(GPU_SAMPLES))
        .sort("ts", "uuid")
    )


def as_host_samples(hosts: pl.DataFrame) -> pl.DataFrame:
    return hosts.select(*(pl.col(c) if c != "samples" else pl.lit(1, I32).alias("samples") for c in HOST_SAMPLES)
                        ).cast(HOST_SAMPLES)  # type: ignore[arg-type]


def rollup_host_samples(samples: pl.DataFrame, every_s: float) -> pl.DataFrame:
    """Samples (raw or rolled up already) summarised per node and `every_s` seconds."""
    return in_slices(samples, "node", lambda share: _rollup_host(share, every_s))


def _rollup_host(samples: pl.DataFrame, every_s: float) -> pl.DataFrame:
    return (
        samples.sort("ts")
        .group_by((pl.col("ts") // every_s * every_s).alias("bucket"), "node")
        .agg(
            pl.col("samples").sum(), _weighted("cpu_utilization_ratio"), pl.col("memory_used_bytes").max(),
            pl.col("memory_total_bytes").drop_nulls().last(), _weighted("load1"), pl.col("gpu_count").min(),
            pl.col("cluster").drop_nulls().last(), pl.col("rack").drop_nulls().last(),
            *(pl.col(c).drop_nulls().last() for c in HOST_COUNTERS),
        )
        .with_columns(pl.col("bucket").alias("ts"))
        .cast(HOST_SAMPLES)  # type: ignore[arg-type]
        .select(list(HOST_SAMPLES))
        .sort("ts", "node")
    )


# Rollup kinds kept in the warm tier beside the raw tables, and how each is made.
ROLLUP_SCHEMAS = {"step_aggs": STEP_AGGS, "gpus_1m": GPU_SAMPLES, "hosts_1m": HOST_SAMPLES,
                  "gpus_1h": GPU_SAMPLES, "hosts_1h": HOST_SAMPLES}
ALL_SCHEMAS = {**SCHEMAS, **ROLLUP_SCHEMAS}


def bounded_step(since: float, until: float, step: float, max_points: int) -> float:
    """`step`, or where [since, until] would touch more than `max_points` buckets of it, the narrowest width in
    whole seconds that touches no more. Buckets start at multiples of their width (as `ts` says), so a range can
    touch one more than its length over the width."""
    def buckets(width: float) -> int:
        return math.floor(until / width) - math.floor(since / width) + 1

    if buckets(step) <= max_points:
        return step
    span = until - since
    width = float(max(1, math.ceil(span / max_points)))
    if buckets(width) > max_points and max_points > 1:
        width = float(max(1, math.ceil(span / (max_points - 1))))  # span/width <= max_points - 1: never one more
    while buckets(width) > max_points:  # max_points 1: until both ends fall in one bucket
        width *= 2
    return width
