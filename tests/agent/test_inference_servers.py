"""Inference servers' /metrics, in each server's documented names, served over HTTP and read by the agent."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.sources.inference import InferenceServersSource


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
            + hist("vllm:inter_token_latency_seconds", m, B, [4 * n, 4 * n, 4 * n, 4 * n], 0.04 * n)
            + hist("vllm:request_queue_time_seconds", m, B, [4 * n, 4 * n, 4 * n, 4 * n], 0.01 * n)
            + gauge("vllm:num_requests_running", m, 5) + gauge("vllm:num_requests_waiting", m, 2)
            + gauge("vllm:kv_cache_usage_perc", m, 0.42)
            + counter("vllm:prompt_tokens", (m, 100 * n)) + counter("vllm:generation_tokens", (m, 400 * n))
            + counter("vllm:request_success", (m + ',finished_reason="stop"', 3 * n), (m + ',finished_reason="length"', n)))


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
    return InferenceServersSource(inference_servers=config, node="n1", deliver=frames.append)


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
