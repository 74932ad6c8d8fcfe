"""How long the console's pages take to render for a fleet of 128 nodes x 8 GPUs (1,024 GPUs).

A real collector (uvicorn, in this process) is fed frames for every GPU and a 64-rank job; each page
is then run with Streamlit's AppTest, which executes the page script as the server would (data
fetching, frames, charts), without a browser. The goal in issue #7: under 2 s per page.

    python -m bench.console
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import uvicorn
from streamlit.testing.v1 import AppTest

from collector.api import create_app
from collector.settings import Settings

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
PAGES = ["pages/1_Fleet.py", "pages/2_Training.py", "pages/3_Inference.py", "pages/4_Findings.py", "pages/5_Node.py"]


def feed(url: str, token: str, nodes: int = 128, gpus: int = 8) -> None:
    now = time.time()
    frames = [{"v": 1, "kind": "host", "node": f"gpu-{n:04d}", "ts": now - 1, "cpu_utilization_ratio": 0.4,
               "memory_used_bytes": 2**36, "memory_total_bytes": 2**41} for n in range(nodes)]
    for frame in frames:
        frame["gpus"] = [{"index": i, "uuid": f"GPU-{frame['node']}-{i}", "name": "NVIDIA H100 80GB HBM3",
                          "utilization_ratio": 0.9, "temperature_celsius": 70.0, "power_watts": 600.0,
                          "health": "healthy"} for i in range(gpus)]
    events = [{"v": 1, "kind": "step", "job": "big", "rank": r, "world_size": 64, "step": s, "ts": now - 300 + s,
               "duration_s": 1.0, "node": f"gpu-{r // 8:04d}", "tokens": 4096} for r in range(64) for s in range(200)]
    body = {"v": 1, "agent_id": "bench", "seq": 0, "node": "bench", "sent_ts": now, "events": events, "frames": frames}
    resp = httpx.post(url + "/v1/ingest", content=json.dumps(body), headers={"Authorization": f"Bearer {token}"}, timeout=60)
    resp.raise_for_status()


def main() -> None:
    with TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), ingest_tokens=frozenset({"w"}), read_tokens=frozenset({"r"}))
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning",
                                               access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        feed(url, "w")
        os.environ.update(FLEETSCOPE_COLLECTOR_URL=url, FLEETSCOPE_READ_TOKEN="r", FLEETSCOPE_CONSOLE_REFRESH_S="0")
        print(f"{'page':24} {'median s':>9} {'max s':>7}   (1,024 GPUs, 128 nodes, a 64-rank job)")
        for page in PAGES:
            times = []
            for _ in range(5):
                at = AppTest.from_file(str(DASHBOARDS / page), default_timeout=60)
                t0 = time.perf_counter()
                at.run()
                times.append(time.perf_counter() - t0)
                assert not at.exception, [e.value for e in at.exception]
            print(f"{page:24} {statistics.median(times):9.2f} {max(times):7.2f}")
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    main()
