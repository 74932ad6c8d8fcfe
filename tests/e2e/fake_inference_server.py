"""An inference server's /metrics for the end-to-end tests: a golden exposition (tests/agent/fixtures/servers/)
whose counters and histograms grow with every scrape, as a serving vLLM's do.

    python -m tests.e2e.fake_inference_server --port 8000 [--fixture vllm_v1]
"""

from __future__ import annotations

import argparse
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.agent.test_inference_servers import _scaled

FIXTURES = Path(__file__).resolve().parents[1] / "agent" / "fixtures" / "servers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fixture", default="vllm_v1")
    args = parser.parse_args()
    lines = (FIXTURES / f"{args.fixture}.prom").read_text().splitlines()
    scrapes = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            with lock:
                scrapes[0] += 1
                n = scrapes[0]
            body = ("\n".join(_scaled(line, n) for line in lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
