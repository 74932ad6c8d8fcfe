"""The hot tier: what the analysis and the console's "now" views need, in memory, within a budget.

Each raw table is a list of frames: an ingest appends its batch's frame (O(batch), under the lock);
readers take the list under the lock and concatenate outside it. A maintenance pass, run every few
seconds off the ingest path, computes what replaces old rows and swaps it in under the lock:
- steps: each rank's last `raw_steps` steps (fewer, down to MIN_STEPS, past STEPS_SHARE of the budget); per-step
  aggregates of every job for the window;
- GPU and host frames: the last `raw_s` seconds raw, per-minute rollups for the window, and the
  latest frame of each GPU and node;
- requests, pauses and server frames: the window.
When the tables outgrow their share of the memory budget, the oldest minutes go first; `held_since`
says from when each table is complete, so reads of older times go to the warm tier instead.
Rollups and final step aggregates also go to the warm tier, at the next checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import polars as pl

from collector.rollups import (ALL_SCHEMAS, STEP_AGGS, STEP_KEY, as_gpu_samples, as_host_samples, in_slices, incarnation_of,
                               merge_step_aggregates, rollup_gpu_samples, rollup_host_samples, step_aggregates)
from collector.tables import KINDS, empty

log = logging.getLogger("fleetscope.collector.hot")

MINUTE = 60.0
HOUR = 3600.0
LATENESS_S = 20.0  # a minute is rolled up once frames dated in it have had this long to arrive
ROLLUP_RAW = {"gpus_1m": "gpus", "hosts_1m": "hosts"}
LATEST_KEYS = {"gpus": ("node", "index"), "hosts": ("node",)}
# The raw steps' most of the hot tier's budget: past it each rank keeps fewer than raw_steps, down to MIN_STEPS, what
# the detectors read of a rank (its first 10 rows are warm-up, then a 16-step window: collector.training) with room.
STEPS_SHARE = 0.5
MIN_STEPS = 32
SHRINK_ORDER = ("requests", "gpus_1m", "hosts_1m", "server_histograms", "server_stats", "step_aggs", "pauses", "gpus", "hosts")


def _concat(chunks: list[pl.DataFrame], kind: str) -> pl.DataFrame:
    if not chunks:
        return pl.DataFrame(schema=ALL_SCHEMAS[kind])
    return chunks[0] if len(chunks) == 1 else pl.concat(chunks, how="vertical", rechunk=False)


def _size(chunks: list[pl.DataFrame]) -> int:
    return sum(c.estimated_size() for c in chunks)


SMALL_CHUNK = 50_000  # rows: chunks smaller than this are merged, larger ones left alone
MERGED_CHUNK = 500_000


def _trim(chunks: list[pl.DataFrame], cutoff: float) -> list[pl.DataFrame]:
    """The rows at or after `cutoff`, chunk by chunk: old chunks are dropped whole and only the chunk
    that straddles the cutoff is copied, so trimming never copies a whole table."""
    out = []
    for chunk in chunks:
        if chunk.height == 0:
            continue
        ts = chunk["ts"]
        if ts.max() < cutoff:  # type: ignore[operator]
            continue
        out.append(chunk if ts.min() >= cutoff else chunk.filter(pl.col("ts") >= cutoff))  # type: ignore[operator]
    return merge_small(out)


def _split(frame: pl.DataFrame, predicate: pl.Expr) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows where `predicate` holds and the others; no copy where all rows fall on one side (the common case:
    a filter copies every column, and these are the hot tier's largest frames)."""
    mask = frame.select(predicate.fill_null(False).alias("_mask")).to_series()
    if mask.all():
        return frame, frame.clear()
    if not mask.any():
        return frame.clear(), frame
    return frame.filter(mask), frame.filter(~mask)


def _newest(frames: list[pl.DataFrame], keys: tuple[str, ...]) -> pl.DataFrame:
    """The newest row of each key (the last of them where several share its newest time). Which rows is worked out
    over the keys and times alone, and only those rows are gathered: sorting the frames whole copied every column of
    every fresh row, twice where a scrape asked while a maintenance pass ran."""
    frame = pl.concat(frames, how="vertical", rechunk=False)
    place = (frame.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), *keys, "ts")
             .sort("ts", maintain_order=True).unique(list(keys), keep="last").get_column("_row").sort())
    return frame[place]


# What step_aggregates reads of a step row.
AGG_INPUT = ("job", "incarnation", "step", "ts", "duration_s", "world_size", "failed", "tokens", "samples", "flops_per_token")


def _touched_rows(chunks: list[pl.DataFrame], fresh: list[pl.DataFrame]) -> pl.DataFrame:
    """The rows (the columns step_aggregates reads) of every (job, step) that the `fresh` step rows touched, from
    the step table's `chunks`: the fresh rows and the older rows of the same steps."""
    # One select of the fresh chunks end to end (a concatenation without rechunk copies nothing), not one a chunk:
    # ~40 us of Python each, and at 100,000 events/s a pass sees about 500 of them.
    fresh_rows = pl.concat(fresh, how="vertical", rechunk=False)
    touched = fresh_rows.select("job", "step")
    older = len(chunks) - len(fresh)
    if older >= 0 and all(a is b for a, b in zip(fresh, chunks[older:])):
        # The fresh rows are the table's tail: only the older rows need the join (a few kept per rank, where the
        # fresh ones are hundreds of thousands at a high event rate). A semi join asks only whether a key is there:
        # the keys need not be unique (making them so took 50-100 ms a pass). Of a few columns: it copies what it keeps.
        kept_rows = _concat(chunks[:older], "steps").select(AGG_INPUT)
        if kept_rows.height:  # keys past the kept rows' last step cannot be theirs: the join is of a few
            top = kept_rows.get_column("step").max()
            kept_rows = kept_rows.join(touched.filter(pl.col("step") <= top), on=["job", "step"], how="semi")
        return pl.concat([kept_rows, fresh_rows.select(AGG_INPUT)], how="vertical", rechunk=False)
    return _concat(chunks, "steps").select(AGG_INPUT).join(touched, on=["job", "step"], how="semi")


def _gather(chunks: list[pl.DataFrame], place: pl.Series) -> list[pl.DataFrame]:
    """The rows at `place` (ascending row numbers over the chunks end to end), chunk by chunk: a chunk kept whole is
    kept as it is, not copied. Steps arrive in time order, so a trim drops the oldest chunks' rows and keeps the
    newer chunks whole: gathering the whole table into one copied every kept row beside the old table (375 MB at
    16,384 ranks, every half minute)."""
    out = []
    heights = [chunk.height for chunk in chunks]
    starts = list(itertools.accumulate(heights, initial=0))
    # Where each chunk's rows begin in `place`, all in one search: one call a chunk cost ~40 us each of Python, and
    # at 100,000 events/s a pass sees about 500 chunks (one per batch).
    bounds = place.search_sorted(pl.Series(starts, dtype=place.dtype), side="left").to_list()
    for chunk, start, height, lo, hi in zip(chunks, starts, heights, bounds, bounds[1:]):
        if hi - lo == height:
            out.append(chunk)
        elif hi > lo:
            out.append(chunk[place.slice(lo, hi - lo) - start])
    return merge_small(out)


def merge_small(chunks: list[pl.DataFrame]) -> list[pl.DataFrame]:
    """Merge runs of small chunks (one per ingested batch) into larger ones; large chunks stay as they are."""
    out: list[pl.DataFrame] = []
    run: list[pl.DataFrame] = []
    rows = 0
    for chunk in chunks:
        if chunk.height >= SMALL_CHUNK:
            if run:
                out.append(pl.concat(run, how="vertical", rechunk=True) if len(run) > 1 else run[0])
                run, rows = [], 0
            out.append(chunk)
            continue
        run.append(chunk)
        rows += chunk.height
        if rows >= MERGED_CHUNK:
            out.append(pl.concat(run, how="vertical", rechunk=True))
            run, rows = [], 0
    if run:
        out.append(pl.concat(run, how="vertical", rechunk=True) if len(run) > 1 else run[0])
    return out


class HotTier:
    def __init__(self, *, window_s: float = 6 * 3600.0, raw_s: float = 300.0, raw_steps: int = 120,
                 budget_bytes: int | None = None) -> None:
        self.window_s, self.raw_s, self.raw_steps = window_s, raw_s, raw_steps
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._maintain_lock = threading.Lock()
        self._tables: dict[str, list[pl.DataFrame]] = {k: [] for k in (*KINDS, "gpus_1m", "hosts_1m")}
        self._fresh: dict[str, list[pl.DataFrame]] = {"steps": [], "gpus": [], "hosts": []}
        # The bytes of each fresh chunk, and their sum: the backlog the next maintenance pass works through. A pass
        # allocates about four times its backlog for a moment (rollups, the steps' aggregates: 680 MiB over 176 MiB of
        # GPU, host and step rows), so the collector keeps the backlog bounded (collector.api: ingest answers 503
        # past it while a pass catches up).
        self._fresh_sizes: dict[str, list[int]] = {k: [] for k in self._fresh}
        self.fresh_bytes = 0
        # GPU and host rows not rolled up yet: new ones, and those of minutes still open.
        self._to_roll: dict[str, list[pl.DataFrame]] = {"gpus": [], "hosts": []}
        self._aggs = pl.DataFrame(schema={**STEP_AGGS, "final": pl.Boolean})
        self._latest = {"gpus": empty("gpus"), "hosts": empty("hosts")}
        self._unwritten: dict[str, list[pl.DataFrame]] = {k: [] for k in ("step_aggs", "gpus_1m", "hosts_1m", "gpus_1h", "hosts_1h")}
        # Minute rollups of hours still open; an hour's are rolled into one row per GPU or node once it closes.
        self._hour_pending: dict[str, list[pl.DataFrame]] = {"gpus": [], "hosts": []}
        self.rolled_upto = {"gpus_1m": 0.0, "hosts_1m": 0.0, "gpus_1h": 0.0, "hosts_1h": 0.0}
        # From when each table is complete in memory (None: from its first row).
        self.held_since: dict[str, float | None] = {k: None for k in self._tables} | {"step_aggs": None}
        self.steps_since: float | None = None  # the oldest raw step row kept (where a restart reloads from)
        self.steps_per_rank = raw_steps  # what each rank keeps: raw_steps, fewer where the budget says (steps_to_keep)
        self._steps_kept, self._steps_trimmed_at = 0, 0.0
        self.maintenance_s = 0.0

    # --- writes -------------------------------------------------------------------------------
    def append(self, frames: dict[str, pl.DataFrame]) -> None:
        with self._lock:
            for kind, frame in frames.items():
                self._tables[kind].append(frame)
                if kind in self._fresh:
                    self._add_fresh(kind, frame)
                if kind in self._to_roll:
                    self._to_roll[kind].append(frame)

    def _add_fresh(self, kind: str, frame: pl.DataFrame) -> None:
        """Under the lock."""
        size = frame.estimated_size()
        self._fresh[kind].append(frame)
        self._fresh_sizes[kind].append(size)
        self.fresh_bytes += size

    def load(self, kind: str, frame: pl.DataFrame) -> None:
        """Rows read back from the warm tier at start-up (raw tables and rollups alike)."""
        if frame.height == 0:
            return
        if kind == "step_aggs":
            with self._lock:
                self._aggs = merge_step_aggregates(self._aggs, frame.with_columns(pl.lit(True).alias("final")))
            return
        if kind in ("gpus_1h", "hosts_1h"):
            return
        if kind in ("gpus_1m", "hosts_1m"):  # minutes of an hour not rolled up yet are rolled again
            rest = frame.filter(pl.col("ts") >= self.rolled_upto[kind.replace("_1m", "_1h")])
            if rest.height:
                with self._lock:
                    self._hour_pending[kind.removesuffix("_1m")].append(rest)
        with self._lock:
            self._tables[kind].append(frame)
            if kind in self._fresh:
                self._add_fresh(kind, frame)
            if kind in self._to_roll:  # rows of minutes the last checkpoint had rolled up already are not again
                rest = frame.filter(pl.col("ts") >= self.rolled_upto[f"{kind}_1m"])
                if rest.height:
                    self._to_roll[kind].append(rest)

    # --- reads --------------------------------------------------------------------------------
    def raw(self, kind: str) -> pl.DataFrame:
        with self._lock:
            chunks = list(self._tables[kind])
        frame = _concat(chunks, kind)
        if len(chunks) > 256:
            self._consolidate(kind, chunks)
        return frame

    def _consolidate(self, kind: str, chunks: list[pl.DataFrame]) -> None:
        """Merge small chunks, unless maintenance is busy with the list."""
        if not self._maintain_lock.acquire(blocking=False):
            return
        try:
            merged = merge_small(chunks)
            with self._lock:
                current = self._tables[kind]
                if len(current) >= len(chunks) and all(a is b for a, b in zip(current, chunks)):
                    current[:len(chunks)] = merged
        finally:
            self._maintain_lock.release()

    def step_aggs(self) -> pl.DataFrame:
        """Per (job, incarnation, step) aggregates for the window, the steps reported since the last maintenance
        included."""
        with self._lock:
            aggs, fresh, chunks = self._aggs, list(self._fresh["steps"]), list(self._tables["steps"])
        if fresh:
            aggs = merge_step_aggregates(aggs, step_aggregates(_touched_rows(chunks, fresh)).with_columns(
                pl.lit(False).alias("final")))
        return aggs.drop("final").sort("job", "step", "incarnation")

    def latest(self, kind: str) -> pl.DataFrame:
        """The newest frame of each GPU (node, index) or node, as of the last maintenance and the fresh rows since."""
        with self._lock:
            latest, fresh = self._latest[kind], list(self._fresh[kind])
        return _newest([latest, *fresh], LATEST_KEYS[kind]) if fresh else latest

    def samples(self, kind: str, since: float | None = None, until: float | None = None,
                keys: tuple[str, list] | None = None) -> pl.DataFrame:
        """GPU ("gpus") or host ("hosts") samples over [since, until]: rollups where raw rows have aged out,
        raw rows where they are kept. `keys` = (column, values) filters first (a node's GPUs, one GPU)."""
        raw, rolled = self.raw(kind), self.raw(f"{kind}_1m")
        convert = as_gpu_samples if kind == "gpus" else as_host_samples

        def cut(frame: pl.DataFrame, width: float = 0.0) -> pl.DataFrame:
            if keys is not None:
                frame = frame.filter(pl.col(keys[0]).is_in(keys[1]))
            if since is not None:  # a rollup counts when its minute overlaps the range
                frame = frame.filter(pl.col("ts") + width > since) if width else frame.filter(pl.col("ts") >= since)
            if until is not None:
                frame = frame.filter(pl.col("ts") <= until)
            return frame

        raw = cut(raw)
        raw_start = self.held_since.get(kind)
        if raw_start is None:
            raw_start = float(raw["ts"].min()) if raw.height else float("inf")  # type: ignore[arg-type]
        older = cut(rolled, MINUTE).filter(pl.col("ts") + MINUTE <= raw_start).with_columns(pl.lit(MINUTE).alias("span_s"))
        return pl.concat([older, convert(raw).with_columns(pl.lit(0.0).alias("span_s"))], how="vertical").sort("ts")

    def complete_since(self, kind: str) -> float | None:
        """Oldest time from which this table (or, for gpus/hosts, their samples) is complete in memory."""
        if kind in ("gpus", "hosts"):
            return self.held_since.get(f"{kind}_1m") or self.held_since.get(kind)
        return self.held_since.get(kind)

    def memory(self) -> dict[str, int]:
        with self._lock:
            sizes = {k: _size(v) for k, v in self._tables.items()}
            sizes["step_aggs"] = self._aggs.estimated_size()
            sizes["latest"] = sum(f.estimated_size() for f in self._latest.values())
            sizes["rollups_unwritten"] = sum(_size(v) for v in self._unwritten.values())
        return sizes

    def held(self) -> int:
        """Bytes of what the budget counts: the tables, the step aggregates and the latest frames."""
        sizes = self.memory()
        return sum(v for k, v in sizes.items() if k != "rollups_unwritten")

    def rows(self) -> dict[str, int]:
        with self._lock:
            out = {k: sum(c.height for c in v) for k, v in self._tables.items()}
            out["step_aggs"] = self._aggs.height
        return out

    # --- checkpoint ---------------------------------------------------------------------------
    def take_unwritten(self) -> tuple[dict[str, list[pl.DataFrame]], dict]:
        """Rollups and final step aggregates not yet on disk, and the state a restart needs; the caller
        writes them and calls `give_back` if it could not."""
        with self._lock:
            out = {k: v[:] for k, v in self._unwritten.items() if v}
            for v in self._unwritten.values():
                v.clear()
            state = {"rolled_upto": dict(self.rolled_upto), "held_since": dict(self.held_since),
                     "steps_since": self.steps_since}
        return out, state

    def give_back(self, unwritten: dict[str, list[pl.DataFrame]]) -> None:
        with self._lock:
            for k, v in unwritten.items():
                self._unwritten[k][:0] = v

    def restore(self, state: dict) -> None:
        """What a checkpoint recorded: how far rollups went, and from when each table was complete."""
        for kind, ts in (state.get("rolled_upto") or {}).items():
            if kind in self.rolled_upto:
                self.rolled_upto[kind] = max(self.rolled_upto[kind], float(ts))
        for kind, ts in (state.get("held_since") or {}).items():
            if kind in self.held_since and ts is not None:
                self.held_since[kind] = float(ts)

    # --- maintenance --------------------------------------------------------------------------
    def maintain(self, now: float | None = None) -> None:
        """Aggregate, roll up, trim and fit the budget; safe to run beside ingest and reads."""
        now = time.time() if now is None else now
        with self._maintain_lock:
            started = time.perf_counter()
            with self._lock:
                snap = {k: list(v) for k, v in self._tables.items()}
                fresh = {k: list(v) for k, v in self._fresh.items()}
                to_roll = {k: list(v) for k, v in self._to_roll.items()}
            replace: dict[str, list[pl.DataFrame]] = {}  # kind -> chunks that replace its snapshot
            self._maintain_steps(snap["steps"], fresh["steps"], now, replace)
            for kind in ("gpus", "hosts"):
                self._maintain_frames(kind, snap[kind], snap[f"{kind}_1m"], fresh[kind], to_roll[kind], now, replace)
            for kind in ("requests", "pauses", "server_stats", "server_histograms"):
                cutoff = max(now - self.window_s, self.held_since.get(kind) or 0.0)
                if snap[kind]:
                    replace[kind] = _trim(snap[kind], cutoff)
                if snap[kind] or self.held_since.get(kind) is not None:
                    self.held_since[kind] = cutoff
            self._fit_budget(snap, replace, now)
            with self._lock:
                for kind, chunks in replace.items():
                    self._tables[kind][:len(snap[kind])] = chunks
                for kind, chunks in fresh.items():  # seen by the aggregates and latest views now
                    del self._fresh[kind][:len(chunks)]
                    self.fresh_bytes -= sum(self._fresh_sizes[kind][:len(chunks)])
                    del self._fresh_sizes[kind][:len(chunks)]
            self.maintenance_s = time.perf_counter() - started

    def _maintain_steps(self, chunks: list[pl.DataFrame], fresh: list[pl.DataFrame], now: float,
                        replace: dict[str, pl.DataFrame]) -> None:
        steps = _concat(chunks, "steps")
        aggs = self._aggs
        if fresh:
            recent = step_aggregates(_touched_rows(chunks, fresh))
            aggs = merge_step_aggregates(aggs, recent.with_columns(pl.lit(False).alias("final")))
        if steps.height:
            # Trimming copies the table: only once it has grown a quarter past what the last trim kept.
            if steps.height > 1.25 * self._steps_kept or now - self._steps_trimmed_at > 60:
                # Each rank's last steps_per_rank rows. A rank silent for 50 of its job's median steps over them (10
                # minutes at least) while its job went on has left it (a hung job does not go on: its ranks all stay).
                per_rank = self.steps_per_rank = self.steps_to_keep(chunks, steps)
                horizon = pl.max_horizontal(pl.lit(600.0), pl.col("duration_s").median().over("job").cast(pl.Float64) * 50)
                keep = ((pl.col("ts").rank("ordinal", descending=True).over("job", "rank") <= per_rank)
                        & (pl.col("ts").max().over("job", "rank") >= pl.col("ts").max().over("job") - horizon)
                        & (pl.col("ts") >= now - self.window_s))
                # First each rank's rows from its steps_per_rank-th latest ts on (a selection, not a sort: ties make it a
                # few more), then the exact rule over those: ranking hundreds of thousands of fresh rows took 150 ms.
                # Both rules run over the few columns they read, with each row's place in the table; the rows kept
                # are then gathered chunk by chunk (_gather). Filtering the whole table twice made two copies of
                # it beside the old one (at 16,384 ranks about 1 GiB for a moment, the fleet bench's peak).
                latest = pl.col("ts") >= pl.col("ts").top_k(per_rank).min().over("job", "rank")
                place = (steps.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"), "job", "rank", "ts", "duration_s")
                         .filter(latest).filter(keep).get_column("row"))
                kept_chunks = _gather(chunks, place) if place.len() < steps.height else merge_small(chunks)
                replace["steps"] = kept_chunks
                kept = _concat(kept_chunks, "steps")
                self._steps_kept, self._steps_trimmed_at = kept.height, now
                self.steps_since = float(kept["ts"].min()) if kept.height else None  # type: ignore[arg-type]
            else:
                kept = steps
            live = kept.select("job", incarnation_of(kept), "step").unique()
        else:
            live = pl.DataFrame(schema={k: STEP_AGGS[k] for k in STEP_KEY})
        # An aggregate whose step has no raw row left is final: it goes to disk once. Only the open rows are
        # looked at (a join over the whole table to set the flag took 30 ms and more a pass).
        open_rows = aggs.filter(~pl.col("final"))
        newly = open_rows.join(live, on=list(STEP_KEY), how="anti")
        if newly.height:
            aggs = pl.concat([aggs.filter(pl.col("final")), newly.with_columns(pl.lit(True).alias("final")),
                              open_rows.join(live, on=list(STEP_KEY), how="semi")], how="vertical", rechunk=False)
        cutoff = now - self.window_s
        if aggs.height and aggs.get_column("end_ts").min() < cutoff:  # type: ignore[operator]
            aggs = aggs.filter(pl.col("end_ts") >= cutoff)
        if aggs.n_chunks() > 8:  # each pass adds chunks; a table of many is slow to read
            aggs = aggs.rechunk()
        with self._lock:
            self._aggs = aggs
            if newly.height:
                self._unwritten["step_aggs"].append(newly.drop("final"))
        self.held_since["step_aggs"] = cutoff

    def steps_to_keep(self, chunks: list[pl.DataFrame], steps: pl.DataFrame) -> int:
        """How many steps each rank keeps: raw_steps, or as many as fit in STEPS_SHARE of the budget at the table's
        bytes a row, but never fewer than MIN_STEPS. At 16,384 ranks 120 steps each held 250-310 MiB in the fleet
        bench, just under half the hot tier's third of a 2 GiB budget; twice the ranks would pass it."""
        size = _size(chunks)
        if self.budget_bytes is None or size <= STEPS_SHARE * self.budget_bytes:
            return self.raw_steps
        ranks = steps.select("job", "rank").n_unique()
        fits = int(STEPS_SHARE * self.budget_bytes / (size / steps.height) / ranks)
        return max(MIN_STEPS, min(self.raw_steps, fits))

    def _maintain_frames(self, kind: str, chunks: list[pl.DataFrame], rolled_chunks: list[pl.DataFrame],
                         fresh: list[pl.DataFrame], to_roll: list[pl.DataFrame], now: float,
                         replace: dict[str, pl.DataFrame]) -> None:
        rollup = f"{kind}_1m"
        latest = _newest([self._latest[kind], *fresh], LATEST_KEYS[kind]) if fresh else self._latest[kind]
        latest = latest.filter(pl.col("ts") >= now - self.window_s)
        # Roll up the rows of closed minutes (ended at least LATENESS_S ago), late ones included; rows of
        # open minutes wait. A minute whose rows came in two parts has two rollup rows: samples add up.
        upto = (now - LATENESS_S) // MINUTE * MINUTE
        new_rollup, still_open = None, []
        if to_roll:
            rows = pl.concat(to_roll, how="vertical", rechunk=False)
            closed, open_rows = _split(rows, pl.col("ts") < upto)
            if closed.height:
                key, convert, roll = (("uuid", as_gpu_samples, rollup_gpu_samples) if kind == "gpus"
                                      else ("node", as_host_samples, rollup_host_samples))
                # Converted and rolled up a share of the GPUs (nodes) at a time: the copies are of a share only.
                new_rollup = in_slices(closed, key, lambda share: roll(convert(share), MINUTE))
            still_open = [open_rows] if open_rows.height else []
        self.rolled_upto[rollup] = max(self.rolled_upto[rollup], upto)
        # Raw rows go on a minute boundary, so that rollups end where raw rows begin.
        raw_cutoff = max((now - self.raw_s) // MINUTE * MINUTE, self.held_since.get(kind) or 0.0)
        if chunks:
            replace[kind] = _trim(chunks, raw_cutoff)
        if chunks or self.held_since.get(kind) is not None:
            self.held_since[kind] = raw_cutoff
        roll_cutoff = max(now - self.window_s, self.held_since.get(rollup) or 0.0)
        if rolled_chunks:
            replace[rollup] = _trim(rolled_chunks, roll_cutoff)
        if rolled_chunks or new_rollup is not None:
            self.held_since[rollup] = roll_cutoff
        hourly, hour_rest = None, []
        pending = [*self._hour_pending[kind], *([new_rollup] if new_rollup is not None and new_rollup.height else [])]
        hour_upto = upto // HOUR * HOUR
        if pending:
            closed, rest = _split(pl.concat(pending, how="vertical", rechunk=False), pl.col("ts") < hour_upto)
            if closed.height:
                hourly = (rollup_gpu_samples if kind == "gpus" else rollup_host_samples)(closed, HOUR)
            hour_rest = [rest] if rest.height else []
        self.rolled_upto[f"{kind}_1h"] = max(self.rolled_upto[f"{kind}_1h"], hour_upto)
        with self._lock:
            self._latest[kind] = latest
            self._to_roll[kind][:len(to_roll)] = still_open
            self._hour_pending[kind] = hour_rest
            if hourly is not None and hourly.height:
                self._unwritten[f"{kind}_1h"].append(hourly)
            if new_rollup is not None and new_rollup.height:
                self._tables[rollup].append(new_rollup)
                self._unwritten[rollup].append(new_rollup)

    def _fit_budget(self, snap: dict[str, list[pl.DataFrame]], replace: dict[str, list[pl.DataFrame]], now: float) -> None:
        """Over budget: drop the oldest tenth of the largest time-windowed tables until the tier fits."""
        if self.budget_bytes is None:
            return

        def chunks_of(kind: str) -> list[pl.DataFrame]:
            return replace[kind] if kind in replace else snap[kind]

        kinds = list(SHRINK_ORDER)
        for _ in range(50):
            sizes = {k: (self._aggs.estimated_size() if k == "step_aggs" else _size(chunks_of(k))) for k in kinds}
            total = sum(sizes.values()) + _size(chunks_of("steps")) + sum(f.estimated_size() for f in self._latest.values())
            if total <= self.budget_bytes:
                return
            kind = max(kinds, key=lambda k: sizes[k])
            if sizes[kind] == 0:
                break
            if kind == "step_aggs":
                aggs = self._aggs
                lo = float(aggs["end_ts"].min())  # type: ignore[arg-type]
                cutoff = lo + (now - lo) / 10
                with self._lock:
                    self._aggs = aggs.filter(pl.col("end_ts") >= cutoff)
                self.held_since["step_aggs"] = cutoff
                continue
            chunks = [c for c in chunks_of(kind) if c.height]
            if not chunks:
                break
            lo = min(float(c["ts"].min()) for c in chunks)  # type: ignore[arg-type]
            cutoff = lo + max((now - lo) / 10, 1.0)
            replace[kind] = _trim(chunks, cutoff)
            self.held_since[kind] = cutoff
            log.debug("memory budget: %s now held from %.0f s ago", kind, now - cutoff)
        log.warning("memory budget of %d bytes cannot be met by dropping old rows alone", self.budget_bytes)
