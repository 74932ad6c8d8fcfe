"""Inference servers' /metrics, in each server's own names, served over HTTP and read by the agent.

The golden expositions in fixtures/servers/ are written by fixtures/servers/generate.py from each server's
metric definitions at a pinned release (each file's header names the upstream file and version)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.frames import ServerFrames
from agent.inference_servers import SERVERS, delta, parse
from agent.sources.inference import InferenceServersSource


class Collecting:
    """A source's collections as the agent ships them: each sample's readings to the shipper's frame builder."""

    def __init__(self, source: InferenceServersSource, frames: list) -> None:
        self.source, self.frames, self.builder = source, frames, ServerFrames()

    def collect(self):
        got = self.source.collect()
        self.frames += self.builder.frames(got.servers, "n1")
        return got

FIXTURES = Path(__file__).parent / "fixtures" / "servers"


def hist(name: str, labels: str, bounds: list[str], counts: list[float], total: float) -> str:
    sep = "," if labels else ""
    lines = [f"# HELP {name} h", f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(bounds, counts)]
    lines += [f"{name}_sum{{{labels}}} {total}", f"{name}_count{{{labels}}} {counts[-1]}"]
    return "\n".join(lines) + "\n"


def counter(name: str, *series: tuple[str, float]) -> str:
    """As prometheus_client writes a counter (vLLM, SGLang): HELP and TYPE name the `_total` series."""
    lines = [f"# HELP {name}_total c", f"# TYPE {name}_total counter"]
    lines += [f"{name}_total{{{labels}}} {value}" for labels, value in series]
    return "\n".join(lines) + "\n"


def bare_counter(name: str, *series: tuple[str, float]) -> str:
    """As Rust's metrics exporter (TGI) and prometheus-cpp (Triton) write one: no `_total`."""
    lines = [f"# HELP {name} c", f"# TYPE {name} counter"]
    lines += [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in series]
    return "\n".join(lines) + "\n"


def gauge(name: str, labels: str, value: float) -> str:
    return f"# HELP {name} g\n# TYPE {name} gauge\n{name}{{{labels}}} {value}\n"


B = ["0.1", "0.5", "1.0", "+Inf"]


def vllm(n: int) -> str:  # n: how many of each event so far
    m = 'model_name="llama3-8b"'
    return (hist("vllm:time_to_first_token_seconds", m, B, [2 * n, 3 * n, 4 * n, 4 * n], 0.6 * n)
            + hist("vllm:e2e_request_latency_seconds", m, B, [0, n, 3 * n, 4 * n], 3.0 * n)
            + hist("vllm:request_time_per_output_token_seconds", m, B, [4 * n, 4 * n, 4 * n, 4 * n], 0.04 * n)
            + hist("vllm:request_queue_time_seconds", m, B, [4 * n, 4 * n, 4 * n, 4 * n], 0.01 * n)
            + gauge("vllm:num_requests_running", m, 5) + gauge("vllm:num_requests_waiting", m, 2)
            + gauge("vllm:kv_cache_usage_perc", m, 0.42)
            + counter("vllm:prompt_tokens", (m, 100 * n)) + counter("vllm:generation_tokens", (m, 400 * n))
            + counter("vllm:request_success", (m + ',finished_reason="stop"', 3 * n), (m + ',finished_reason="length"', n),
                      (m + ',finished_reason="abort"', 0), (m + ',finished_reason="error"', 0)))


def sglang(n: int) -> str:
    m = 'model_name="qwen"'
    return (hist("sglang:time_to_first_token_seconds", m, B, [n, 2 * n, 2 * n, 2 * n], 0.3 * n)
            + hist("sglang:e2e_request_latency_seconds", m, B, [0, 0, 2 * n, 2 * n], 1.6 * n)
            + gauge("sglang:num_running_reqs", m, 7) + gauge("sglang:num_queue_reqs", m, 1) + gauge("sglang:token_usage", m, 0.28)
            + counter("sglang:generation_tokens", (m, 50 * n)) + counter("sglang:num_requests", (m, 2 * n)))


def tgi(n: int) -> str:
    return (hist("tgi_request_duration", "", B, [0, n, n, n], 0.3 * n)
            + hist("tgi_request_mean_time_per_token_duration", "", B, [n, n, n, n], 0.02 * n)
            + hist("tgi_request_generated_tokens", "", ["10", "100", "+Inf"], [0, n, n], 60 * n)
            + gauge("tgi_queue_size", "", 3) + gauge("tgi_batch_current_size", "", 4)
            + bare_counter("tgi_request_success", ("", n)) + bare_counter("tgi_request_failure", ('err="validation"', 0)))


def triton(n: int) -> str:
    m = 'model="resnet",version="1"'
    return (bare_counter("nv_inference_request_success", (m, 10 * n)) + bare_counter("nv_inference_request_failure", (m, n))
            + bare_counter("nv_inference_request_duration_us", (m, 10 * n * 25_000))
            + bare_counter("nv_inference_queue_duration_us", (m, 10 * n * 1_000))
            + gauge("nv_inference_pending_request_count", m, 6))


@pytest.fixture
def servers():
    state = {"n": 1, "up": True}
    texts = {"/vllm": vllm, "/sglang": sglang, "/tgi": tgi, "/triton": triton}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if not state["up"]:
                self.send_error(503)
                return
            body = texts[self.path](state["n"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["base"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()


def source_for(servers, frames):
    base = servers["base"]
    config = [{"url": f"{base}/vllm", "kind": "vllm", "service": "chat"},
              {"url": f"{base}/sglang", "kind": "sglang", "service": "agentic"},
              {"url": f"{base}/tgi", "kind": "tgi", "service": "summarise", "model": "mistral-7b"},
              {"url": f"{base}/triton", "kind": "triton", "service": "vision"}]
    return Collecting(InferenceServersSource(inference_servers=config, node="n1"), frames)


def test_each_server_becomes_per_model_deltas(servers):
    frames = []
    source = source_for(servers, frames)
    first = {(r.name, r.labels): r.value for r in source.collect()}
    assert frames == []  # one reading is not an interval yet
    assert first[("fleetscope_inference_requests_running", (("service", "chat"), ("model", "llama3-8b")))] == 5
    assert first[("fleetscope_inference_kv_cache_usage_ratio", (("service", "agentic"), ("model", "qwen")))] == 0.28
    assert first[("fleetscope_inference_requests_waiting", (("service", "vision"), ("model", "resnet")))] == 6
    servers["n"] = 3  # two more rounds of traffic
    source.collect()
    by = {(f.service, f.model): f for f in frames}
    chat = by[("chat", "llama3-8b")]
    assert chat.kind == "vllm" and chat.node == "n1"
    assert chat.histograms["ttft"].counts == [4, 6, 8, 8] and chat.histograms["ttft"].count == 8
    assert chat.histograms["ttft"].le[-1] == 1e300
    assert chat.histograms["e2e"].sum == pytest.approx(6.0)
    assert set(chat.histograms) == {"ttft", "e2e", "tpot", "queue"}
    assert chat.counters["generation_tokens"] == 800 and chat.counters["requests_ok"] == 8  # both finish reasons
    assert by[("agentic", "qwen")].counters["requests_ok"] == 4
    summarise = by[("summarise", "mistral-7b")]  # TGI names no model: the configured one
    assert summarise.histograms["tpot"].count == 2 and summarise.counters["generation_tokens"] == 120
    vision = by[("vision", "resnet")]
    assert vision.counters["e2e_sum"] == pytest.approx(20 * 0.025) and vision.counters["e2e_count"] == 20
    assert vision.counters["requests_error"] == 2


def test_a_server_restart_resets_its_counters_without_negative_deltas(servers):
    frames = []
    source = source_for(servers, frames)
    servers["n"] = 5
    source.collect()
    servers["n"] = 1  # restarted: counters start again
    source.collect()
    chat = next(f for f in frames if f.service == "chat")
    assert chat.histograms["ttft"].count == 4 and min(chat.histograms["ttft"].counts) >= 0


def test_a_server_that_does_not_answer_is_down_and_the_others_carry_on(servers):
    source = source_for(servers, [])
    servers["up"] = False
    values = {(r.name, r.labels): r.value for r in source.collect()}
    assert values[("fleetscope_inference_server_up", (("service", "chat"), ("url", f"{servers['base']}/vllm")))] == 0


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        InferenceServersSource(inference_servers=[{"url": "http://x/metrics", "kind": "ollama", "service": "s"}])


# --- the golden expositions ---------------------------------------------------------------------------------
# What the collector relies on from each kind of server (its quantiles, error ratio, tokens/s, the Inference
# page's KV-cache, queue, preemption and prefix-cache panels). A release that renames one of these fails here
# once its fixture is regenerated.
RELIED_ON = {
    "vllm_v1": ("vllm", {"e2e", "queue", "ttft", "tpot"}, {"running", "waiting", "kv_cache"},
                {"prompt_tokens", "generation_tokens", "requests_ok", "requests_error", "requests_aborted", "preemptions",
                 "prefix_cache_queries", "prefix_cache_hits"}),
    "vllm_v0": ("vllm", {"e2e", "queue", "ttft", "tpot"}, {"running", "waiting", "kv_cache"},
                {"prompt_tokens", "generation_tokens", "requests_ok", "requests_error", "requests_aborted", "preemptions"}),
    "sglang": ("sglang", {"e2e", "queue", "ttft", "tpot"}, {"running", "waiting", "kv_cache"},
               {"prompt_tokens", "generation_tokens", "requests_ok", "requests_error", "requests_aborted", "preemptions",
                "prefix_cache_queries", "prefix_cache_hits"}),
    "tgi": ("tgi", {"e2e", "queue", "tpot"}, {"running", "waiting"},  # TGI has no time-to-first-token histogram
            {"prompt_tokens", "generation_tokens", "requests_ok", "requests_error"}),
    "triton": ("triton", {"ttft"}, {"waiting"}, {"requests_ok", "requests_error", "e2e_sum", "e2e_count", "queue_sum",
                                                  "queue_count"}),  # means only, from cumulative microseconds
}


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.prom").read_text()


@pytest.mark.parametrize("name", sorted(RELIED_ON))
def test_every_golden_exposition_names_its_source_and_yields_what_the_collector_relies_on(name):
    text = fixture(name)
    assert text.startswith("# Golden exposition") and "generate.py" in text.splitlines()[0]
    kind, histograms, gauges, counters = RELIED_ON[name]
    models = parse(kind, text, "configured-model")
    assert models, f"{name}: nothing parsed"
    everything = {"h": set(), "g": set(), "c": set()}
    for reading in models.values():
        everything["h"] |= set(reading.histograms)
        everything["g"] |= set(reading.gauges)
        everything["c"] |= set(reading.counters)
        for h in reading.histograms.values():
            assert h.le == sorted(h.le) and h.le[-1] == float("inf") and h.counts[-1] == h.count
    assert histograms <= everything["h"], f"{name}: missing histograms {histograms - everything['h']}"
    assert gauges <= everything["g"], f"{name}: missing gauges {gauges - everything['g']}"
    assert counters <= everything["c"], f"{name}: missing counters {counters - everything['c']}"


@pytest.mark.parametrize("name", sorted(RELIED_ON))
def test_each_name_the_agent_reads_first_is_in_the_golden_exposition(name):
    """The first (current) name of each of our figures is the one the release exposes: a fallback that
    silently stands in for a renamed metric would hide the rename. vLLM's V0 fixture is the fallbacks' test."""
    kind = RELIED_ON[name][0]
    text = fixture(name)
    families = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            families |= {family, family.removesuffix("_total")}
    spec = SERVERS[kind]
    wanted = [names[0] for names, *_ in (*spec.get("histograms", {}).values(), *spec.get("gauges", {}).values(),
                                        *spec.get("counters", {}).values())]
    if name == "vllm_v0":
        wanted = [n for n in wanted if n not in ("vllm:request_time_per_output_token_seconds", "vllm:kv_cache_usage_perc",
                                                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits")]
    if kind == "triton":
        wanted += [total for total, _, _ in spec["means"].values()]
        wanted += [summary for summary, _ in spec["summaries"].values()]
    missing = [n for n in wanted if n not in families]
    assert not missing, f"{name}: {missing} not in the exposition"


def test_vllm_v1_counts_aborts_and_errors_as_failures_and_averages_kv_cache_over_engines():
    (model,) = parse("vllm", fixture("vllm_v1"), "x").values()
    # 200 requests over two engines: 3 aborted and 1 error; stop, length and repetition are successes
    assert model.counters["requests_ok"] == 196 and model.counters["requests_error"] == 4
    assert model.counters["requests_aborted"] == 3
    assert model.gauges["kv_cache"] == pytest.approx(0.55)  # (0.62 + 0.48) / 2, not 1.10
    assert model.gauges["running"] == 21 and model.gauges["waiting"] == 3  # requests add up over engines
    # TPOT is one observation per request (vllm:request_time_per_output_token_seconds), not per token
    assert model.histograms["tpot"].count == 200
    assert model.histograms["tpot"].sum == pytest.approx(200 * (0.015 + 0.02 + 0.04) / 3, rel=0.02)


def test_vllm_v0_falls_back_to_its_own_names():
    (model,) = parse("vllm", fixture("vllm_v0"), "x").values()
    assert model.gauges["kv_cache"] == pytest.approx(0.55)  # vllm:gpu_cache_usage_perc
    assert model.histograms["tpot"].count == 1000  # vllm:time_per_output_token_seconds (per token in V0)
    assert model.counters["requests_error"] == 2 and model.counters["requests_ok"] == 48


def test_sglang_successes_are_requests_less_aborts():
    (model,) = parse("sglang", fixture("sglang"), "x").values()
    assert model.counters["requests_ok"] == 114 and model.counters["requests_error"] == 6
    assert model.counters["prefix_cache_hits"] / model.counters["prefix_cache_queries"] == pytest.approx(0.25)
    assert model.histograms["ttft"].count == 120  # streaming and not, summed


def test_tgi_and_triton_say_what_they_cannot_give():
    (tgi,) = parse("tgi", fixture("tgi"), "mistral-7b").values()
    assert "ttft" not in tgi.histograms and tgi.counters["requests_error"] == 3  # every `err` reason
    assert tgi.counters["generation_tokens"] == 50 * 120 + 50 * 250
    triton = parse("triton", fixture("triton"), "x")
    assert set(triton) == {"resnet50", "llama-ensemble"}
    assert triton["resnet50"].histograms == {}  # means only
    assert triton["resnet50"].counters["e2e_sum"] / triton["resnet50"].counters["e2e_count"] == pytest.approx(0.021)
    assert triton["llama-ensemble"].histograms["ttft"].le[0] == pytest.approx(0.1)  # milliseconds to seconds


def test_a_fixture_read_twice_with_more_traffic_gives_the_difference():
    text = fixture("vllm_v1")
    doubled = "\n".join(_scaled(line, 2) for line in text.splitlines())
    (first,) = parse("vllm", text, "x").values()
    (second,) = parse("vllm", doubled, "x").values()
    d = delta(second, first)
    assert d.counters["requests_error"] == 4 and d.histograms["ttft"].count == 200


def _scaled(line: str, factor: float) -> str:
    """A sample line of a counter or histogram with its value multiplied: what more traffic looks like."""
    if line.startswith("#") or not line.strip():
        return line
    name, value = line.rsplit(" ", 1)
    base = name.split("{")[0]
    if base.endswith(("_total", "_bucket", "_sum", "_count")) and not base.endswith("_created"):
        return f"{name} {float(value) * factor}"
    return line


@pytest.mark.skipif(__import__("shutil").which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize("name", ["vllm_v1", "vllm_v0", "sglang"])
def test_prometheus_client_fixtures_are_valid_expositions(name):
    import subprocess

    result = subprocess.run(["promtool", "check", "metrics"], check=False, input=fixture(name), capture_output=True, text=True)
    # promtool lints names (vLLM's colons, counters without _total); only parse errors fail it outright
    assert "error while linting" not in result.stderr.lower() and "text format parsing error" not in result.stderr.lower()


def test_a_sample_that_never_reached_a_snapshot_loses_no_requests(servers):
    """Server frames are made from the snapshots' cumulative readings (agent/frames.ServerFrames), not by the
    source as it reads: a sample whose inference source overran its deadline is dropped by the sampler, and the
    next frame's interval spans it instead of losing what it counted."""
    source = InferenceServersSource(inference_servers=[{"url": f"{servers['base']}/vllm", "kind": "vllm",
                                                        "service": "chat"}], node="n1")
    builder, frames = ServerFrames(), []
    servers["n"] = 1
    frames += builder.frames(source.collect().servers, "n1")
    servers["n"] = 2
    source.collect()  # overran: never published
    servers["n"] = 4
    frames += builder.frames(source.collect().servers, "n1")
    (chat,) = frames
    assert chat.histograms["ttft"].count == 3 * 4 and chat.counters["requests_ok"] == 3 * 4  # rounds 2, 3 and 4


def test_the_shipper_sends_the_server_frames_of_the_snapshots_it_is_given(servers, tmp_path):
    from agent.sampler import Sampler
    from agent.shipper import Shipper

    source = InferenceServersSource(inference_servers=[{"url": f"{servers['base']}/vllm", "kind": "vllm",
                                                        "service": "chat"}], node="n1")
    sampler = Sampler([source], interval_s=60)
    shipper = Shipper("http://127.0.0.1:9", None, agent_id="a1", node="n1")  # never started: nothing is sent
    try:
        servers["n"] = 1
        shipper.enqueue_snapshot(sampler.sample_once())
        servers["n"] = 2
        shipper.enqueue_snapshot(sampler.sample_once())
        kinds = [server for server, _ in shipper.frames]
        assert kinds == [False, False, True]  # two host frames, and one interval of the server
    finally:
        sampler.stop()
        shipper.client.close()
