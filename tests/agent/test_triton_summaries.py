"""Triton's latency summaries (summary_latencies=true) become the quantiles the collector gets: from the golden
exposition built from Triton core's own definitions, read over HTTP by the real source, into the collector's
histogram_quantile."""

from __future__ import annotations

import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.inference_servers import SUMMARY_BOUNDS, delta, parse, summary_histogram
from agent.sources.inference import InferenceServersSource
from collector.inference import histogram_quantile, histogram_quantiles
from tests.agent.test_inference_servers import Collecting, _scaled

TRITON = (Path(__file__).parent / "fixtures" / "servers" / "triton.prom").read_text()
# resnet50's request and queue summaries in the fixture, in seconds
E2E = {0.5: 0.019, 0.9: 0.027, 0.95: 0.031, 0.99: 0.045, 0.999: 0.060}
QUEUE = {0.5: 0.0012, 0.9: 0.0025, 0.95: 0.0032, 0.99: 0.005, 0.999: 0.008}


def test_the_fixture_s_summaries_parse_as_triton_writes_them():
    resnet = parse("triton", TRITON, "x")["resnet50"]
    (e2e,) = resnet.summaries["e2e"].values()  # one series: model resnet50, version 1
    assert e2e.quantiles == pytest.approx(E2E) and e2e.count == 900 and e2e.sum == pytest.approx(18.9)
    (queue,) = resnet.summaries["queue"].values()
    assert queue.quantiles == pytest.approx(QUEUE)
    assert set(resnet.summaries) == {"e2e", "queue"}  # the compute summaries have no figure of ours


def test_an_interval_s_summary_becomes_a_histogram_whose_quantiles_are_triton_s():
    first = parse("triton", TRITON, "x")
    later = parse("triton", "\n".join(_scaled(line, 2) for line in TRITON.splitlines()), "x")  # 900 more requests
    d = delta(later["resnet50"], first["resnet50"])
    e2e = d.histograms["e2e"]
    assert e2e.le[:-1] == SUMMARY_BOUNDS and e2e.le[-1] == math.inf
    assert e2e.count == 900 and e2e.sum == pytest.approx(18.9)  # the interval's count and sum are exact
    assert e2e.counts == sorted(e2e.counts) and e2e.counts[-1] == 900
    le = [b if b != math.inf else 1e300 for b in e2e.le]
    for q in (0.5, 0.95, 0.99):  # within the layout's bucket, as the collector reads them back
        assert histogram_quantile(le, e2e.counts, q) == pytest.approx(E2E[q], rel=0.1), q
        assert histogram_quantile(le, d.histograms["queue"].counts, q) == pytest.approx(QUEUE[q], rel=0.1), q
    assert "e2e_sum" in d.counters  # the means stay as they were
    # llama-ensemble: its TTFT stays the server's own histogram; its e2e comes from its summary
    llama = delta(later["llama-ensemble"], first["llama-ensemble"])
    assert llama.histograms["ttft"].le[0] == pytest.approx(0.1)
    assert histogram_quantile([b if b != math.inf else 1e300 for b in llama.histograms["e2e"].le],
                              llama.histograms["e2e"].counts, 0.99) == pytest.approx(1.3, rel=0.1)


def test_no_interval_no_requests_or_an_empty_window_give_no_histogram():
    first = parse("triton", TRITON, "x")["resnet50"]
    assert delta(first, first).histograms.get("e2e") is None  # no request in the interval: its stale window is not counted
    assert "e2e" not in delta(first, parse("triton", "", "x").get("resnet50") or type(first)()).histograms  # first sight
    assert summary_histogram({0.5: math.nan, 0.99: math.nan}, 10, 1.0) is None  # prometheus-cpp's "Nan": empty window
    nan = TRITON.replace('quantile="0.5"} 19000', 'quantile="0.5"} Nan')
    later = parse("triton", "\n".join(_scaled(line, 2) for line in nan.splitlines()), "x")["resnet50"]
    assert "e2e" not in delta(later, first).histograms and "queue" in delta(later, first).histograms


def test_two_versions_of_a_model_add_their_requests_and_a_restart_counts_from_zero():
    lines = []
    for line in TRITON.splitlines():  # resnet50 version 2 beside version 1, with the same traffic
        lines.append(line)
        if line.startswith("nv_inference_request_summary_us") and "resnet50" in line:
            lines.append(line.replace('version="1"', 'version="2"'))
    two = "\n".join(lines) + "\n"
    first = parse("triton", two, "x")["resnet50"]
    assert len(first.summaries["e2e"]) == 2
    later = parse("triton", "\n".join(_scaled(line, 3) for line in two.splitlines()), "x")["resnet50"]
    assert delta(later, first).histograms["e2e"].count == 2 * 1800
    assert delta(first, later).histograms["e2e"].count == 2 * 900  # counts went down: restarted, all since count


def test_the_real_source_ships_triton_quantiles_that_the_collector_reads_back(tmp_path):
    state = {"factor": 1}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = "\n".join(_scaled(line, state["factor"]) for line in TRITON.splitlines()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    frames = []
    try:
        source = Collecting(InferenceServersSource(node="n1", inference_servers=[
            {"url": f"http://127.0.0.1:{httpd.server_address[1]}/metrics", "kind": "triton", "service": "vision"}]), frames)
        source.collect()
        state["factor"] = 2
        source.collect()
    finally:
        httpd.shutdown()
    frame = next(f for f in frames if f.model == "resnet50")
    assert set(frame.histograms) == {"e2e", "queue"}
    import polars as pl

    rows = pl.DataFrame([{"model": frame.model, "metric": m, "le": h.le, "counts": h.counts, "sum": h.sum, "count": h.count}
                         for m, h in frame.histograms.items()])
    got = {r["metric"]: r for r in histogram_quantiles(rows, ["model"]).iter_rows(named=True)}
    assert got["e2e"]["p99_s"] == pytest.approx(0.045, rel=0.1) and got["e2e"]["mean_s"] == pytest.approx(0.021)
    assert got["queue"]["p50_s"] == pytest.approx(0.0012, rel=0.1)
