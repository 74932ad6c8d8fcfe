"""Reading inference servers' own /metrics (vLLM, SGLang, TGI, Triton) into one shape: pure, no I/O.

Each server names things its own way; `SERVERS` maps its names onto ours: latency histograms
(e2e, queue, ttft, tpot), gauges (running, waiting, kv_cache) and counters (prompt and generated
tokens, successful and failed requests, aborted ones among the failed, preemptions, prefix-cache
queried and hit tokens). `parse` reads one exposition text into cumulative values
per model; `delta` turns two consecutive readings into what happened in between, which is what
the collector aggregates (counters are cumulative, and a server restart resets them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# Which series of a family count: (label, values, True) keeps those values, (label, values, False) the others.
ERRORS = ("finished_reason", frozenset({"abort", "error"}), True)
NOT_ERRORS = ("finished_reason", frozenset({"abort", "error"}), False)
ABORTS = ("finished_reason", frozenset({"abort"}), True)

# kind -> our names -> their family names, tried in order (the first present wins). Histograms carry the unit
# scale to seconds; gauges how a model's series (one per data-parallel engine or rank) combine: running and
# waiting requests add up, a usage ratio is averaged (summed, two engines at 60% would read 120%).
# The golden expositions in tests/agent/fixtures/servers/ come from each server's own definitions (their
# headers name the file and release): a name here that a release drops fails tests/agent/test_inference_servers.py.
SERVERS: dict[str, dict] = {
    "vllm": {
        "model_label": "model_name",
        "histograms": {
            "e2e": (["vllm:e2e_request_latency_seconds"], 1.0),
            # Its smallest bucket is 0.3 s: queue quantiles below that are interpolated, the mean is exact.
            "queue": (["vllm:request_queue_time_seconds"], 1.0),
            "ttft": (["vllm:time_to_first_token_seconds"], 1.0),
            # One observation per request. Not vllm:inter_token_latency_seconds: that one counts tokens, so long
            # answers outweigh short ones. time_per_output_token_seconds is the V0 engine's (per token too).
            "tpot": (["vllm:request_time_per_output_token_seconds", "vllm:time_per_output_token_seconds"], 1.0),
        },
        "gauges": {"running": (["vllm:num_requests_running"], "sum"), "waiting": (["vllm:num_requests_waiting"], "sum"),
                   # 0-1 despite the name; gpu_cache_usage_perc is the V0 engine's
                   "kv_cache": (["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"], "mean")},
        "counters": {"prompt_tokens": (["vllm:prompt_tokens"], None),
                     "generation_tokens": (["vllm:generation_tokens"], None),
                     # finished_reason stop, length (and repetition) are successes; abort and error are not
                     "requests_ok": (["vllm:request_success"], NOT_ERRORS),
                     "requests_error": (["vllm:request_success"], ERRORS),
                     "requests_aborted": (["vllm:request_success"], ABORTS),
                     "preemptions": (["vllm:num_preemptions"], None),
                     "prefix_cache_queries": (["vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"], None),
                     "prefix_cache_hits": (["vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"], None)},
    },
    "sglang": {
        "model_label": "model_name",
        "histograms": {
            "e2e": (["sglang:e2e_request_latency_seconds"], 1.0),
            "queue": (["sglang:queue_time_seconds"], 1.0),
            "ttft": (["sglang:time_to_first_token_seconds"], 1.0),
            "tpot": (["sglang:request_time_per_output_token_seconds", "sglang:time_per_output_token_seconds"], 1.0),
        },
        "gauges": {"running": (["sglang:num_running_reqs"], "sum"), "waiting": (["sglang:num_queue_reqs"], "sum"),
                   "kv_cache": (["sglang:token_usage"], "mean")},
        "counters": {"prompt_tokens": (["sglang:prompt_tokens"], None),
                     "generation_tokens": (["sglang:generation_tokens"], None),
                     # num_requests counts every finished request, aborted ones too: ok = all - aborted (below)
                     "requests_all": (["sglang:num_requests"], None),
                     "requests_error": (["sglang:num_aborted_requests"], None),
                     "requests_aborted": (["sglang:num_aborted_requests"], None),
                     "preemptions": (["sglang:num_retracted_requests"], None),  # SGLang retracts under KV pressure
                     "prefix_cache_queries": (["sglang:prompt_tokens"], None),
                     "prefix_cache_hits": (["sglang:cached_tokens"], None)},
    },
    "tgi": {  # one model per server, no model label: the configured model name is used. No TTFT histogram.
        "model_label": None,
        "histograms": {
            "e2e": (["tgi_request_duration"], 1.0),
            "queue": (["tgi_request_queue_duration"], 1.0),
            "tpot": (["tgi_request_mean_time_per_token_duration"], 1.0),
        },
        "gauges": {"running": (["tgi_batch_current_size"], "sum"), "waiting": (["tgi_queue_size"], "sum")},
        "counters": {"requests_ok": (["tgi_request_success"], None), "requests_error": (["tgi_request_failure"], None)},
        "histogram_sums": {"prompt_tokens": "tgi_request_input_length", "generation_tokens": "tgi_request_generated_tokens"},
    },
    "triton": {
        "model_label": "model",
        "histograms": {"ttft": (["nv_inference_first_response_histogram_ms"], 1e-3)},  # decoupled models, when enabled
        # Triton's latencies are cumulative microsecond counters: a mean per interval. Started with
        # --metrics-config summary_latencies=true it adds summaries (quantiles over its last minute), which become
        # histograms on SUMMARY_BOUNDS (see summary_histogram). The request summary is off where the model caches.
        "means": {"e2e": ("nv_inference_request_duration_us", "nv_inference_request_success", 1e-6),
                  "queue": ("nv_inference_queue_duration_us", "nv_inference_request_success", 1e-6)},
        "summaries": {"e2e": ("nv_inference_request_summary_us", 1e-6), "queue": ("nv_inference_queue_summary_us", 1e-6)},
        "gauges": {"waiting": (["nv_inference_pending_request_count"], "sum")},
        "counters": {"requests_ok": (["nv_inference_request_success"], None),
                     "requests_error": (["nv_inference_request_failure"], None)},
    },
}


def _kept(labels: dict, where) -> bool:
    if where is None:
        return True
    label, values, keep = where
    return (labels.get(label) in values) == keep


@dataclass
class Histogram:
    le: list[float]  # upper bounds in seconds, ascending, ending with +Inf
    counts: list[float]  # cumulative counts per bound
    sum: float
    count: float


@dataclass
class Summary:
    """One series of a Prometheus summary: its quantiles now (seconds) and its cumulative sum and count."""

    quantiles: dict[float, float]
    sum: float = 0.0
    count: float = 0.0


@dataclass
class ModelReading:
    histograms: dict[str, Histogram] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # cumulative; includes means' sums and counts
    summaries: dict[str, dict[tuple, Summary]] = field(default_factory=dict)  # ours -> series (its labels) -> Summary


# A summary's quantiles cannot be added up over intervals or replicas; a histogram's buckets can, and that is what
# the collector does with every server's latencies. So each interval's summary becomes a histogram on one fixed
# layout: 10 bounds a decade from 100 us to 100 s (61 bounds, then +Inf; quantiles below 100 us are interpolated
# and the collector says so). Read back with histogram_quantile, one interval's p50/p95/p99 come out within one
# bucket of Triton's (26%), typically a few percent (median 2% at p50, 6% at p99, on made-up shapes).
SUMMARY_BOUNDS = [float(f"{10 ** (k / 10):.6g}") for k in range(-40, 21)]


def summary_histogram(quantiles: dict[float, float], count: float, total: float) -> Histogram | None:
    """`count` observations (summing to `total`) spread as a summary's quantiles say, as a histogram on
    SUMMARY_BOUNDS: the distribution is linear between the quantiles (from 0 at 0), and what lies above the highest
    quantile (0.1% with Triton's defaults) is put at it. None when the quantiles are not known (an empty window:
    prometheus-cpp writes NaN) or there are no observations.

    What "the last interval" means for a summary: Triton's summaries are prometheus-cpp's, whose quantiles cover
    the observations of the last 48 to 60 s (max_age 60 s in 5 age buckets, rotated every 12 s; Triton keeps the
    defaults), while their count and sum are cumulative since start. So an interval's count and sum (its mean) are
    exact, and its observations are given the shape of the last minute: a change in latency shows within a minute,
    smoothed over it. Over a longer range the collector adds the intervals' histograms: quantiles of the
    request-weighted mix of the minutes' shapes, not an average of p99s, and not the exact quantiles of those
    requests, which a summary cannot give."""
    if count <= 0 or not quantiles or any(math.isnan(v) or math.isinf(v) for v in quantiles.values()):
        return None
    knots = [(0.0, 0.0)]
    for q, v in sorted(quantiles.items()):
        knots.append((max(v, knots[-1][0]), q))  # CKMS estimates can cross by their error: kept monotone
    top = knots[-1][0]
    counts = []
    i = 1
    for bound in SUMMARY_BOUNDS:
        if bound >= top:
            counts.append(count)
            continue
        while knots[i][0] <= bound:
            i += 1
        (x0, y0), (x1, y1) = knots[i - 1], knots[i]
        counts.append(count * (y0 + (y1 - y0) * (bound - x0) / (x1 - x0)))
    return Histogram([*SUMMARY_BOUNDS, math.inf], [*counts, count], total, count)


def parse(kind: str, text: str, default_model: str) -> dict[str, ModelReading]:
    """One server's exposition -> cumulative readings per model."""
    spec = SERVERS[kind]
    label = spec["model_label"]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    out: dict[str, ModelReading] = {}

    def model_of(labels: dict) -> str:
        return (labels.get(label) if label else None) or default_model

    def first(names: list[str]):
        # Counters appear as "x" (prometheus_client strips _total from the family) or, from other
        # exporters' text, under either name: try both.
        for n in names:
            for candidate in (n, n + "_total"):
                fam = families.get(candidate)
                if fam is not None and fam.samples:
                    return fam
        return None

    for ours, (names, scale) in spec.get("histograms", {}).items():
        fam = first(names)
        if fam is None:
            continue
        per_model: dict[str, dict] = {}
        for s in fam.samples:
            m = per_model.setdefault(model_of(s.labels), {"buckets": {}, "sum": 0.0, "count": 0.0})
            if s.name.endswith("_bucket"):
                bound = math.inf if s.labels["le"] in ("+Inf", "Inf") else float(s.labels["le"]) * scale
                m["buckets"][bound] = m["buckets"].get(bound, 0.0) + s.value  # summed over other labels
            elif s.name.endswith("_sum"):
                m["sum"] += s.value * scale
            elif s.name.endswith("_count"):
                m["count"] += s.value
        for model, m in per_model.items():
            bounds = sorted(m["buckets"])
            out.setdefault(model, ModelReading()).histograms[ours] = Histogram(
                bounds, [m["buckets"][b] for b in bounds], m["sum"], m["count"])
    for ours, (names, how) in spec.get("gauges", {}).items():
        fam = first(names)
        values: dict[str, list[float]] = {}
        for s in fam.samples if fam else ():
            values.setdefault(model_of(s.labels), []).append(s.value)
        for model, vs in values.items():
            out.setdefault(model, ModelReading()).gauges[ours] = sum(vs) / len(vs) if how == "mean" else sum(vs)
    for ours, (names, where) in spec.get("counters", {}).items():
        fam = first(names)
        for s in fam.samples if fam else ():
            if s.name.endswith("_created") or not _kept(s.labels, where):
                continue
            reading = out.setdefault(model_of(s.labels), ModelReading())
            reading.counters[ours] = reading.counters.get(ours, 0.0) + s.value
    for ours, fam_name in spec.get("histogram_sums", {}).items():
        fam = families.get(fam_name)
        for s in fam.samples if fam else ():
            if s.name.endswith("_sum"):
                reading = out.setdefault(model_of(s.labels), ModelReading())
                reading.counters[ours] = reading.counters.get(ours, 0.0) + s.value
    for ours, (total_name, count_name, scale) in spec.get("means", {}).items():
        for name, key in ((total_name, f"{ours}_sum"), (count_name, f"{ours}_count")):
            fam = first([name])
            for s in fam.samples if fam else ():
                if s.name.endswith("_created"):
                    continue
                reading = out.setdefault(model_of(s.labels), ModelReading())
                reading.counters[key] = reading.counters.get(key, 0.0) + s.value * (scale if key.endswith("_sum") else 1)
    for ours, (name, scale) in spec.get("summaries", {}).items():
        fam = families.get(name)
        for s in fam.samples if fam else ():
            labels = {k: v for k, v in s.labels.items() if k != "quantile"}
            series = out.setdefault(model_of(labels), ModelReading()).summaries.setdefault(ours, {}).setdefault(
                tuple(sorted(labels.items())), Summary({}))
            if s.name.endswith("_sum"):
                series.sum = s.value * scale
            elif s.name.endswith("_count"):
                series.count = s.value
            elif "quantile" in s.labels:
                series.quantiles[float(s.labels["quantile"])] = s.value * scale
    for reading in out.values():
        every = reading.counters.pop("requests_all", None)
        if every is not None:
            reading.counters["requests_ok"] = max(every - reading.counters.get("requests_error", 0.0), 0.0)
    return out


@dataclass(frozen=True, slots=True)
class ServerReading:
    """One model of one inference server as one sample read it: its cumulative counts. A Snapshot carries these
    (Snapshot.servers); the shipper's frame builder (agent/frames.ServerFrames) turns two in a row into what
    happened between them, so a sample that was dropped (its source overran) makes the next interval longer, and
    loses nothing."""

    url: str
    kind: str
    service: str
    model: str
    ts: float
    reading: ModelReading


def _d(new: float, old: float | None) -> float:
    # A counter that went down was reset by a server restart: everything since counts.
    return new if old is None or new < old else new - old


def delta(new: ModelReading, old: ModelReading) -> ModelReading:
    """What happened between two cumulative readings of one model (gauges are taken as they are now)."""
    out = ModelReading(gauges=dict(new.gauges))
    for name, h in new.histograms.items():
        prev = old.histograms.get(name)
        if prev is None or prev.le != h.le:
            continue  # first sight of it, or its buckets changed: no interval to measure yet
        reset = h.count < prev.count
        out.histograms[name] = Histogram(
            h.le, [c if reset else c - p for c, p in zip(h.counts, prev.counts)],
            h.sum if reset else h.sum - prev.sum, h.count if reset else h.count - prev.count)
    for name, value in new.counters.items():
        if name in old.counters:
            out.counters[name] = _d(value, old.counters[name])
    for name, series in new.summaries.items():
        if name in out.histograms:
            continue  # the server's own histogram
        merged: Histogram | None = None
        for key, now in series.items():
            before = old.summaries.get(name, {}).get(key)
            if before is None:
                continue  # first sight: no interval yet
            reset = now.count < before.count
            h = summary_histogram(now.quantiles, now.count if reset else now.count - before.count,
                                  now.sum if reset else now.sum - before.sum)
            if h is not None:  # several series of a model (its versions): their observations add up
                merged = h if merged is None else Histogram(h.le, [a + b for a, b in zip(merged.counts, h.counts)],
                                                            merged.sum + h.sum, merged.count + h.count)
        if merged is not None:
            out.histograms[name] = merged
    return out
