"""`fleetscope demo`: the whole platform on one machine, fed by a simulated fleet and real workloads.

Starts the collector, one agent per simulated node (simulated GPUs), a synchronous training job
across the nodes and an inference service (both reporting through the real client), the
Streamlit console, and Prometheus + Alertmanager when they are installed. Prints the URLs and
stops everything it started on Ctrl-C or after --duration seconds.

The story (`Story`, with two nodes of six GPUs or more): a fault scenario that node-01's agent plays
and that the training ranks on node-01 play too, for the GPU under each (fleetscope.sim.training),
from the same start: GPU 3 overheats and its rank slows with its clock; later GPU 5's XID kills the
rank on it and the job restarts from its last checkpoint. The chat service's latency spike is the
inference process's own, timed on the story's clock.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fleetscope import assets
from fleetscope.vocabulary import AGENT_EVENTS_PORT, AGENT_METRICS_PORT, COLLECTOR_PORT, CONSOLE_PORT

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_PORT, ALERTMANAGER_PORT = 9090, 9093


def agent_ports(i: int) -> tuple[int, int]:
    """(metrics, events) ports of the i-th simulated node; node 0 gets the defaults."""
    return (AGENT_METRICS_PORT, AGENT_EVENTS_PORT) if i == 0 else (9900 + 2 * i, 9901 + 2 * i)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log = self.logs / f"{name}.log"
        fh = open(log, "ab")
        proc = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,  # we stop them, in order
        )
        fh.close()
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        # Workloads first, then agents (they flush to the collector), then the rest.
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers do: a port left in TIME_WAIT by a previous run is free to bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_http(url: str, timeout: float = 30.0, headers: dict[str, str] | None = None, ca_file: Path | None = None) -> bool:
    """Whether `url` answers (below 500) within `timeout`; an https URL must verify against `ca_file`."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2, context=context) as resp:
                if resp.status < 500:
                    return True
        except Exception:
            time.sleep(0.3)
    return False


def prometheus_config(n_nodes: int, read_token: str, rules: list[Path], ca_file: Path | None = None) -> str:
    """Prometheus scraping the agents, and the collector with the read token (over HTTPS, verified against
    `ca_file`, when given)."""
    agents = ", ".join(f"'127.0.0.1:{agent_ports(i)[0]}'" for i in range(n_nodes))
    rule_lines = "".join(f"  - '{r}'\n" for r in rules)
    tls = f"    scheme: https\n    tls_config:\n      ca_file: '{ca_file}'\n" if ca_file else ""
    return f"""# Written by `fleetscope demo`.
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
{rule_lines or '  []'}
alerting:
  alertmanagers:
    - static_configs:
        - targets: ['127.0.0.1:{ALERTMANAGER_PORT}']
scrape_configs:
  - job_name: fleetscope-agent
    sample_limit: 20000
    static_configs:
      - targets: [{agents}]
  - job_name: fleetscope-collector
    sample_limit: 20000
    authorization:
      credentials: '{read_token}'
{tls}    static_configs:
      - targets: ['127.0.0.1:{COLLECTOR_PORT}']
"""


@dataclass(frozen=True)
class Story:
    """When things happen in the demo's story, in seconds from its start (when the agents start), and
    how the training job checkpoints and restarts. FLEETSCOPE_DEMO_STORY="thermal=0,xid=60,..." changes
    them (the tests tell the story in under two minutes)."""

    thermal: float = 90.0  # GPU 3 of node-01 loses its cooling
    spike: float = 180.0  # the chat service's prefill slows down for spike_s
    spike_s: float = 120.0
    xid: float = 240.0  # GPU 5 of node-01 reports XID 13: the rank on it dies, and the job restarts
    checkpoint_every: int = 50  # steps between checkpoint saves
    checkpoint_s: float = 3.0  # how long a save takes
    restart_delay: float = 10.0  # from the rank's death to the job's new processes
    startup_s: float = 5.0  # from a rank's process start to its first step (loading the checkpoint)

    @classmethod
    def parse(cls, text: str) -> Story:
        values: dict[str, float | int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, raw = item.partition("=")
            kind = cls.__dataclass_fields__.get(key.strip())
            if kind is None:
                raise ValueError(f"FLEETSCOPE_DEMO_STORY: unknown {key.strip()!r}; known: {', '.join(cls.__dataclass_fields__)}")
            try:
                values[key.strip()] = int(raw) if kind.type == "int" else float(raw)
            except ValueError:
                raise ValueError(f"FLEETSCOPE_DEMO_STORY: {key.strip()} must be a number of {'steps' if kind.type == 'int' else 'seconds'}, "
                                 f"got {raw!r}") from None
        return cls(**values)  # type: ignore[arg-type]


def demo_scenario(story: Story, start_ts: float) -> str:
    """What goes wrong in the demo, on node-01 (see agent/gpu/scenario.py for the format). Its agent and the
    training ranks on that node play it from the same start."""
    return f"""# Written by `fleetscope demo`.
start_ts = {start_ts:.3f}   # fault times count from here (the demo's start), for the agent and the training ranks alike

[[fault]]   # GPU 3 loses its cooling: it heats into thermal slowdown, and the rank on it computes at its clock
at_s = {story.thermal:g}
gpu = 3
kind = "thermal"

[[fault]]   # an application error on GPU 5: the rank on it dies, so the job restarts (XID 13 opens a ticket, it does not page)
at_s = {story.xid:g}
gpu = 5
kind = "xid"
xid = 13
"""


DEMO_SLOS = """# Written by `fleetscope demo`.
[[slo]]
name = "chat-ttft"
service = "chat"
indicator = "ttft"
threshold_s = 0.3
objective = 0.99

[[slo]]
name = "chat-availability"
service = "chat"
indicator = "availability"
objective = 0.99
"""

ALERTMANAGER_CONFIG = """# Written by `fleetscope demo`: alerts are visible in the Alertmanager UI, sent nowhere.
route:
  receiver: demo
  group_by: [alertname]
  group_wait: 5s
receivers:
  - name: demo
"""


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the demo as Ctrl-C does: every child is stopped too


def alertmanager_config(webhook: str) -> str:
    """The project's routing and inhibitions (alerts/alertmanager.yml), with both receivers pointed at the demo."""
    try:
        text = assets.alertmanager_template().read_text()
    except assets.AssetMissing:
        return ALERTMANAGER_CONFIG
    for kind in ("page", "ticket"):
        text = text.replace(f"http://127.0.0.1:9/fleetscope-{kind}-webhook-placeholder", f"{webhook}/{kind}")
    return text


def notifications_url() -> str:
    """A webhook in this process that prints each notification, so the story's alerts show in the terminal."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import json
    import threading

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            for alert in body.get("alerts", []):
                if alert.get("status") == "firing":
                    print(f"  ALERT [{self.path.strip('/')}] {alert['labels'].get('alertname')}: "
                          f"{alert.get('annotations', {}).get('summary', '')}", flush=True)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def demo_tls(folder: Path) -> tuple[Path, Path, Path] | None:
    """(CA certificate, collector's certificate, its key) of a CA made now in `folder`, or None without the
    `cryptography` package (the demo then runs over plain HTTP)."""
    try:
        from fleetscope.certs import CA
    except ImportError:
        return None
    # A new CA each start: the previous one's files go, so nothing is left trusting a CA no process holds a key for.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    ca = CA(folder, days=30)  # the demo may run for days; the CA is thrown away at the next start
    cert, key = ca.issue("collector", server=True)
    return ca.path, cert, key


def main(args) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        story = Story.parse(getattr(args, "story", None) or os.environ.get("FLEETSCOPE_DEMO_STORY", ""))
    except ValueError as exc:
        print(f"fleetscope demo: {exc}", file=sys.stderr)
        return 2
    py = sys.executable
    workdir = Path(args.workdir).resolve()
    demo = Demo(workdir)
    # Each agent has a token of its own, bound to its node: a stolen one writes as that node only.
    agent_tokens = {f"node-{i:02d}": secrets.token_urlsafe(16) for i in range(args.nodes)}
    read_token = secrets.token_urlsafe(16)
    read = {"FLEETSCOPE_READ_TOKEN": read_token}
    collector_env = {**read, "FLEETSCOPE_INGEST_TOKEN": "\n".join(f"{t} {node}" for node, t in agent_tokens.items())}

    prom, am = shutil.which("prometheus"), shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    want_prom = bool(prom) and not args.no_prometheus
    needed = [COLLECTOR_PORT] + [p for i in range(args.nodes) for p in agent_ports(i)]
    needed += [] if args.no_console else [CONSOLE_PORT]
    needed += [PROMETHEUS_PORT, ALERTMANAGER_PORT] if want_prom else []
    busy = [p for p in needed if not port_free(p)]
    if busy:
        print(f"fleetscope demo: port(s) {', '.join(map(str, busy))} already in use; stop what holds them and retry", file=sys.stderr)
        return 2

    tls = demo_tls(workdir / "tls")
    ca_file = tls[0] if tls else None
    if tls is None:
        print("fleetscope demo: the cryptography package is not installed, so the collector serves plain HTTP; "
              "`pip install 'fleetscope[demo]'` (or `make demo`) installs it", file=sys.stderr)
    collector_url = f"{'https' if tls else 'http'}://127.0.0.1:{COLLECTOR_PORT}"
    try:
        (workdir / "collector.toml").write_text(DEMO_SLOS)
        demo.start("collector", [py, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{COLLECTOR_PORT}",
                                 "--data-dir", str(workdir / "collector"), "--config", str(workdir / "collector.toml"),
                                 *(["--tls-cert", str(tls[1]), "--tls-key", str(tls[2])] if tls else [])], collector_env)
        if not wait_http(f"{collector_url}/healthz", ca_file=ca_file):
            print(f"fleetscope demo: the collector did not start; see {workdir / 'logs/collector.log'}", file=sys.stderr)
            return 1
        event_addrs = []
        story_told = args.nodes > 1 and args.gpus > 5
        scenario = workdir / "faults.toml"
        start_ts = time.time()  # the story's clock: the agents and the training ranks count fault times from it
        scenario.write_text(demo_scenario(story, start_ts))
        for i in range(args.nodes):
            metrics_port, events_port = agent_ports(i)
            event_addrs.append(f"127.0.0.1:{events_port}")
            demo.start(f"agent-node-{i:02d}", [
                py, "-m", "fleetscope", "agent", "--node", f"node-{i:02d}", "--gpu-backend", "simulated",
                "--gpus", str(args.gpus), "--seed", str(i), "--interval", "2",
                "--metrics-address", f"127.0.0.1:{metrics_port}", "--events-address", f"127.0.0.1:{events_port}",
                "--collector-url", collector_url, "--spool-dir", str(workdir / f"spool-node-{i:02d}"),
                *(["--scenario", str(scenario)] if i == 1 and story_told else []),
                *(["--ca-file", str(ca_file)] if ca_file else []),
            ], {"FLEETSCOPE_INGEST_TOKEN": agent_tokens[f"node-{i:02d}"]})
        for i in range(args.nodes):
            wait_http(f"http://127.0.0.1:{agent_ports(i)[0]}/metrics")
        if want_prom:
            rules = assets.rule_files()  # AssetMissing (a broken install) stops the demo, saying what is missing
            (workdir / "prometheus.yml").write_text(prometheus_config(args.nodes, read_token, rules, ca_file))
            demo.start("prometheus", [prom, f"--config.file={workdir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                                      f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"])
            if am:
                (workdir / "alertmanager.yml").write_text(alertmanager_config(notifications_url()))
                demo.start("alertmanager", [am, f"--config.file={workdir / 'alertmanager.yml'}",
                                            f"--storage.path={workdir / 'alertmanager-data'}",
                                            f"--web.listen-address=127.0.0.1:{ALERTMANAGER_PORT}", "--cluster.listen-address="])
        # Each rank computes at the clock of the simulated GPU under it, the one its node's agent reports:
        # the rank on node-01's GPU 3 slows when the scenario overheats that GPU, and the rank on GPU 5 dies at its XID.
        demo.start("training", [py, "-m", "fleetscope.sim.training", "--job", "demo-llama-8b",
                                "--agents", ",".join(event_addrs), "--gpus-per-node", str(args.gpus), "--gpu-model",
                                *(["--scenario", f"node-01={scenario}"] if story_told else []),
                                "--checkpoint-every", str(story.checkpoint_every), "--checkpoint-s", str(story.checkpoint_s),
                                "--restart-delay", str(story.restart_delay), "--startup-s", str(story.startup_s)])
        spike_at = story.spike - (time.time() - start_ts)  # the story's clock, not the inference process's
        demo.start("inference", [py, "-m", "fleetscope.sim.inference", "--service", "chat", "--model", "llama3-8b",
                                 "--agent", event_addrs[0],
                                 *(["--spike-at", f"{spike_at:.1f}", "--spike-s", str(story.spike_s)] if story_told else [])])
        if not args.no_console:
            demo.start("console", [py, "-m", "fleetscope", "dashboard", "--address", "127.0.0.1", "--port", str(CONSOLE_PORT),
                                   "--collector-url", collector_url],
                       {**read, **({"FLEETSCOPE_CA_FILE": str(ca_file)} if ca_file else {})})

        print("fleetscope demo is running:")
        if not args.no_console:
            print(f"  console        http://127.0.0.1:{CONSOLE_PORT}")
        print(f"  collector API  {collector_url}/docs   (read token: {read_token})")
        if ca_file:
            print(f"  CA certificate {ca_file}   (the collector's HTTPS; e.g. curl --cacert)")
        for i in range(args.nodes):
            print(f"  agent node-{i:02d}  http://127.0.0.1:{agent_ports(i)[0]}/metrics")
        if want_prom:
            print(f"  Prometheus     http://127.0.0.1:{PROMETHEUS_PORT}")
            if am:
                print(f"  Alertmanager   http://127.0.0.1:{ALERTMANAGER_PORT}")
        elif not args.no_prometheus:
            print("  (Prometheus is not installed; `make test` as root installs it)")
        if story_told:
            print(f"  the story: at {story.thermal:g} s GPU 3 of node-01 loses its cooling, slows into thermal slowdown and its rank")
            print(f"  becomes a straggler; at {story.spike:g} s the chat service's time to first token spikes and burns its SLO;")
            print(f"  at {story.xid:g} s GPU 5 of node-01 reports XID 13, the rank on it dies, and the job restarts from its last")
            print(f"  checkpoint (every {story.checkpoint_every} steps) {story.restart_delay + story.startup_s:g} s later: "
                  "its goodput counts the recomputed steps and the restart")
        print(f"  logs in {demo.logs}")
        print("Ctrl-C stops everything." if args.duration is None else f"Stopping after {args.duration:.0f} s.")
        sys.stdout.flush()

        deadline = None if args.duration is None else time.monotonic() + args.duration
        reported: set[str] = set()
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
            for child in demo.dead():
                if child.name not in reported:
                    reported.add(child.name)
                    print(f"fleetscope demo: {child.name} exited with code {child.proc.returncode}; see {child.log}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        print("fleetscope demo: stopping...")
        demo.stop_all()
    return 0
