"""The read API at datacenter scale, in process: a store's hot tier filled with a fleet's frames (4,096 nodes x 8
GPUs by default, as bench/fleet.py), then the big read endpoints timed through the real FastAPI app (Starlette's
TestClient: routing, dependencies, the endpoint in the thread pool and the JSON encoding, without a socket), and
/v1/gpus broken down into its parts.

    python -m bench.read_api [--nodes 4096] [--gpus 8] [--frames 12] [--runs 7] [--server]

--server: the same reads from a real collector process (uvicorn, httptools) over a socket, as bench/fleet.py
reads them, instead of in process.

A minute of frames every 5 s per node by default (--frames 12); bench/fleet.py's full run is the reference
figure, this one is for comparing changes to the read path in a minute or two instead of fifteen.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from bench.fleet import _frame
from collector.api import create_app
from collector.settings import Settings
from collector.store import Store
from fleetscope.schema import decode_batch

READ = "read-secret"
R = {"Authorization": f"Bearer {READ}"}


def fill(store: Store, nodes: int, gpus: int, frames: int) -> float:
    """Ingest `frames` frames per node, 5 s apart, then upkeep (as the analysis pass does), then a minute more of
    frames from a twelfth of the nodes (what arrives between two passes, 5 s apart, when each node sends a batch a
    minute): the latest frames are then partly the hot tier's kept ones and partly fresh. Returns the seconds."""
    started = time.perf_counter()
    t1 = time.time() - 5

    def send(node: int, seq: int, end: float) -> None:
        body = ",".join(_frame(node, gpus, end - 5 * (frames - 1 - k), k == frames - 1) for k in range(frames))
        store.ingest(decode_batch(f'{{"v":1,"agent_id":"agent-{node:05d}","seq":{seq},"node":"node-{node:05d}",'
                                  f'"sent_ts":{end},"events":[],"frames":[{body}]}}'.encode()))

    for node in range(nodes):
        send(node, 0, t1 - 60)
    store.maintain_hot()
    for node in range(0, nodes, 12):
        send(node, 1, t1)
    return time.perf_counter() - started


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def show(name: str, ms: list[float], extra: str = "") -> None:
    print(f"  {name:<44} median {statistics.median(ms):7.1f} ms  (min {min(ms):.1f}, max {max(ms):.1f}){extra}")


def breakdown(app, runs: int) -> None:
    """/v1/gpus's steps one by one, as the route runs them (collector/api/routes/fleet.py)."""
    from collector.api.routes import fleet as route
    from collector.fleet import fleet_gpus

    store = app.state.store

    class Everything:
        since = until = None

    latest = store.hot.latest("gpus")
    gpus = fleet_gpus(latest)
    print(f"  ({latest.height} GPUs)")
    print("/v1/gpus, step by step:")
    show("store.hot.latest('gpus')", timed(lambda: store.hot.latest("gpus"), runs))
    show("_latest(store, r)", timed(lambda: route._latest(store, Everything), runs))
    show("fleet_gpus (latest_per, sort, strings)", timed(lambda: fleet_gpus(latest), runs))
    rows = gpus.to_dicts()
    show(".to_dicts()", timed(lambda: gpus.to_dicts(), runs))
    try:
        from pydantic import TypeAdapter
        adapter = TypeAdapter(dict)
        show("pydantic TypeAdapter(dict) validate+dump_json", timed(
            lambda: adapter.dump_json(adapter.validate_python({"gpus": rows}, from_attributes=True)), runs))
    except ImportError:
        pass
    import json
    show("json.dumps of the dicts", timed(lambda: json.dumps({"gpus": rows}, separators=(",", ":")), runs))
    import msgspec
    show("msgspec.json.encode of the dicts", timed(lambda: msgspec.json.encode({"gpus": rows}), runs))
    try:
        from collector.api.encoding import frame_json
    except ImportError:  # before the read routes wrote their frames with polars
        return
    show("collector.api.encoding.frame_json", timed(lambda: frame_json(gpus), runs))


PATHS = ("/v1/gpus", "/v1/nodes", "/v1/nodes/node-00007", "/v1/nodes/node-00007/series",
         "/v1/gpus?fields=node,index,health", "/v1/gpus?health=degraded,unhealthy")


def serve(port: int, args) -> None:
    """A collector process with the filled store, on 127.0.0.1:port (--serve: what --server starts)."""
    import gc

    import uvicorn

    with tempfile.TemporaryDirectory(prefix="fleetscope-read-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", read_tokens=frozenset({READ}), ingest_tokens=frozenset({"w"}),
                            analysis_interval_s=3600.0, checkpoint_interval_s=3600.0)
        store = Store(settings.data_dir, window_s=settings.window_s, raw_s=settings.raw_window_s, start=False)
        store.open()
        fill(store, args.nodes, args.gpus, args.frames)
        gc.freeze()  # as collector.main does
        uvicorn.Server(uvicorn.Config(create_app(settings, store), host="127.0.0.1", port=port, log_level="warning",
                                      access_log=False, http="httptools")).run()


def over_socket(args) -> None:
    import subprocess
    import sys

    import httpx

    from bench.ingest import free_port

    port = free_port()
    argv = [sys.executable, "-m", "bench.read_api", "--serve", str(port), "--nodes", str(args.nodes), "--gpus",
            str(args.gpus), "--frames", str(args.frames)]
    proc = subprocess.Popen(argv)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=R, timeout=60)
        deadline = time.monotonic() + 600
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the collector process did not start")
            time.sleep(0.5)
        print(f"over a socket, from a collector process ({args.runs} runs each, after one warm-up):")
        for path in PATHS:
            size = len(client.get(path).raise_for_status().content)
            show(f"GET {path}", timed(lambda: client.get(path).raise_for_status(), args.runs), f"  {size / 1e6:.2f} MB")
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4096)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--frames", type=int, default=12, help="frames per node, 5 s apart")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--server", action="store_true", help="read from a collector process over a socket")
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve(args.serve, args)
    if args.server:
        return over_socket(args)
    with tempfile.TemporaryDirectory(prefix="fleetscope-read-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", read_tokens=frozenset({READ}), ingest_tokens=frozenset({"w"}),
                            analysis_interval_s=3600.0, checkpoint_interval_s=3600.0)
        store = Store(settings.data_dir, window_s=settings.window_s, raw_s=settings.raw_window_s, start=False)
        store.open()
        print(f"filling the hot tier: {args.nodes} nodes x {args.gpus} GPUs, {args.frames} frames each ...", flush=True)
        print(f"  {fill(store, args.nodes, args.gpus, args.frames):.1f} s")
        app = create_app(settings, store)
        with TestClient(app) as client:
            print(f"through the app ({args.runs} runs each, after one warm-up):")
            for path in PATHS:
                r = client.get(path, headers=R)
                assert r.status_code == 200, (path, r.status_code, r.text[:300])
                size = len(r.content)
                show(f"GET {path}", timed(lambda: client.get(path, headers=R).raise_for_status(), args.runs),
                     f"  {size / 1e6:.2f} MB")
            breakdown(app, args.runs)
        store.close()


if __name__ == "__main__":
    main()
