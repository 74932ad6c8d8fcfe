"""The `fleetscope` command: agent, collector, dashboard and demo; each imports its service lazily."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request drowns what matters; failures are logged by our own code.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _labels(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"fleetscope agent: --label {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def _agent(args: argparse.Namespace) -> int:
    from agent.config import AgentConfig
    from agent.main import Agent

    try:
        config = AgentConfig.load(
            args.config,
            node=args.node,
            metrics_address=args.metrics_address,
            events_address=args.events_address,
            interval_s=args.interval,
            gpu_backend=args.gpu_backend,
            gpus=args.gpus,
            seed=args.seed,
            scenario=args.scenario,
            expected_gpus=args.expected_gpus,
            collector_url=args.collector_url,
            collector_token=args.collector_token,
            disable_sources=args.disable_source or None,
            compat=args.compat or None,
            labels=_labels(args.label),
            spool_dir=args.spool_dir,
        )
        agent = Agent(config)
    except (ValueError, OSError) as exc:
        print(f"fleetscope agent: {exc}", file=sys.stderr)
        return 2
    agent.run_forever()
    return 0


def _collector(args: argparse.Namespace) -> int:
    from collector.main import run
    from collector.settings import Settings, load_config, parse_duration, parse_size

    kwargs: dict[str, object] = {}
    listen = "0.0.0.0:9837"
    try:
        if args.config:
            kwargs, other = load_config(args.config)
            listen = str(other.get("listen", listen))
        # Flags win over the config file, which wins over the environment.
        for flag, name, parse in (("data_dir", "data_dir", lambda v, w: Path(v)), ("cluster", "cluster", lambda v, w: v),
                                  ("memory_budget", "memory_budget", parse_size), ("window", "window_s", parse_duration),
                                  ("raw_window", "raw_window_s", parse_duration), ("retention", "retention_s", parse_duration),
                                  ("retention_bytes", "retention_bytes", parse_size),
                                  ("checkpoint_interval", "checkpoint_interval_s", parse_duration)):
            value = getattr(args, flag)
            if value is not None:
                kwargs[name] = parse(value, f"--{flag.replace('_', '-')}")
        if args.ingest_token:
            kwargs["ingest_tokens"] = frozenset(args.ingest_token)
        if args.read_token:
            kwargs["read_tokens"] = frozenset(args.read_token)
        settings = Settings(**kwargs)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        print(f"fleetscope collector: {exc}", file=sys.stderr)
        return 2
    host, _, port = (args.listen or listen).rpartition(":")
    run(settings, host or "0.0.0.0", int(port))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    import dashboards

    app = Path(dashboards.__file__).parent / "app.py"
    env = dict(os.environ)
    if args.collector_url:
        env["FLEETSCOPE_COLLECTOR_URL"] = args.collector_url
    argv = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.port", str(args.port), "--server.address", args.address,
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
    ]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def _dashboards_push(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("GRAFANA_TOKEN")
    if not token:
        print("fleetscope dashboards push: give a Grafana service-account token (--token or $GRAFANA_TOKEN)", file=sys.stderr)
        return 2
    try:
        from dashboards.grafana.push import push
    except ImportError:
        print("fleetscope dashboards push: needs grafana-client: pip install 'fleetscope[grafana]' "
              "(in an environment of its own, see pyproject.toml)", file=sys.stderr)
        return 2
    try:
        for title, url in push(args.url, token, folder=args.folder):
            print(f"pushed {title}: {url}")
    except Exception as exc:  # the Grafana API's errors are many; name it and stop
        print(f"fleetscope dashboards push: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fleetscope.demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetscope", description="Monitoring for AI datacenters.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("agent", help="run the per-node agent")
    p.add_argument("--config", help="TOML file with an [agent] table")
    p.add_argument("--node", help="node name (default: hostname)")
    p.add_argument("--metrics-address", help="host:port for /metrics (default 0.0.0.0:9835)")
    p.add_argument("--events-address", help="host:port of the UDP event socket (default 127.0.0.1:9836)")
    p.add_argument("--interval", type=float, help="seconds between samples (default 5)")
    p.add_argument("--gpu-backend", choices=["auto", "nvml", "simulated", "none"])
    p.add_argument("--gpus", type=int, help="number of simulated GPUs (default 8)")
    p.add_argument("--seed", type=int, help="seed of the simulated GPUs")
    p.add_argument("--scenario", help="TOML fault scenario for simulated GPUs (see agent/gpu/scenario.py)")
    p.add_argument("--expected-gpus", type=int, help="GPUs this node should have")
    p.add_argument("--collector-url", help="collector base URL, e.g. http://collector:9837")
    p.add_argument("--collector-token", help="ingest token (default: $FLEETSCOPE_INGEST_TOKEN)")
    p.add_argument("--spool-dir", help="where batches wait while the collector is unreachable (default: $STATE_DIRECTORY/spool)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="the node's place in the fleet, e.g. cluster=a rack=r12")
    p.add_argument("--compat", action="append", choices=["dcgm"], help="also emit another exporter's metric names (dcgm)")
    p.add_argument("--disable-source", action="append", help="source to disable (cpu, memory, storage, network, gpu)")
    p.set_defaults(func=_agent)

    p = sub.add_parser("collector", help="run the central collector")
    p.add_argument("--listen", help="host:port to serve on (default 0.0.0.0:9837)")
    p.add_argument("--config", help="TOML file with a [collector] table (every setting below) and [[slo]] tables")
    p.add_argument("--data-dir", help="where the WAL and the Parquet history live (default: $FLEETSCOPE_DATA_DIR or .fleetscope/collector)")
    p.add_argument("--cluster", help="this cluster's name: a label on the collector's findings and job metrics")
    p.add_argument("--memory-budget", help="memory the collector keeps within, e.g. 2GiB (default: 2 GiB or a quarter of RAM)")
    p.add_argument("--window", help="how long the hot tier keeps rollups, step aggregates and requests in memory (default 6h)")
    p.add_argument("--raw-window", help="how long raw GPU and host frames stay in memory (default 5m)")
    p.add_argument("--retention", help="how long history stays on disk (default 30d)")
    p.add_argument("--retention-bytes", help="most disk the history may use (default: 40%% of the data disk)")
    p.add_argument("--checkpoint-interval", help="how often the WAL is written to Parquet (default 30s)")
    p.add_argument("--ingest-token", action="append", help="token agents use (default: $FLEETSCOPE_INGEST_TOKEN)")
    p.add_argument("--read-token", action="append", help="token readers use (default: $FLEETSCOPE_READ_TOKEN)")
    p.set_defaults(func=_collector)

    p = sub.add_parser("dashboard", help="run the Streamlit console")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="0.0.0.0")
    p.add_argument("--collector-url", help="collector base URL (default: $FLEETSCOPE_COLLECTOR_URL or http://127.0.0.1:9837)")
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("dashboards", help="Grafana dashboards")
    dash = p.add_subparsers(dest="dashboards_command", required=True)
    p = dash.add_parser("push", help="upload fleetscope's dashboards to a Grafana through its HTTP API")
    p.add_argument("--url", default=os.environ.get("GRAFANA_URL", "http://127.0.0.1:3000"))
    p.add_argument("--token", help="service-account token (default: $GRAFANA_TOKEN)")
    p.add_argument("--folder", default="fleetscope", help="folder to put them in (created when missing)")
    p.set_defaults(func=_dashboards_push)

    p = sub.add_parser("demo", help="run the whole platform on this machine on a simulated fleet")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--nodes", type=int, default=2, help="simulated nodes, one agent each")
    p.add_argument("--gpus", type=int, default=8, help="simulated GPUs per node")
    p.add_argument("--workdir", default=".fleetscope/demo", help="where the demo keeps its data and logs")
    p.add_argument("--no-console", action="store_true", help="do not start the Streamlit console")
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus/Alertmanager even if installed")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
