"""The `fleetscope` command: agent, collector, dashboard and demo; each imports its service lazily."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from fleetscope import assets
from fleetscope.secrets import SecretError, read_secret, read_secrets, refused_flag_message
from fleetscope.vocabulary import AGENT_METRICS_PORT, COLLECTOR_PORT, CONSOLE_PORT


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


class _RefusedTokenFlag(argparse.Action):
    """A token flag that used to exist: refused with what to use instead, before anything runs."""

    def __init__(self, option_strings, dest, command: str, env: str, **kwargs) -> None:
        self.command, self.env = command, env
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.exit(2, refused_flag_message(self.command, option_string or self.option_strings[0], self.env))


def _refuse_token_flag(parser: argparse.ArgumentParser, flag: str, command: str, env: str) -> None:
    parser.add_argument(flag, action=_RefusedTokenFlag, command=command, env=env)


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
            disable_sources=args.disable_source or None,
            compat=args.compat or None,
            labels=_labels(args.label),
            spool_dir=args.spool_dir,
            ca_file=args.ca_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            web_config=args.web_config,
            pod_resources_socket=args.pod_resources_socket,
        )
        # A config file is an install (the unit runs one): it must say where to ship, or "" for /metrics alone.
        if args.config and config.collector_url is None:
            raise ValueError(f"{args.config} sets no collector_url: set collector_url = \"https://<collector>:9837\" in its "
                             "[agent] table (and this node's token in /etc/fleetscope/ingest-token), or collector_url = \"\" "
                             "to serve /metrics only")
        if config.collector_url and not config.collector_token and not config.tls_cert:
            raise ValueError(f"shipping to {config.collector_url} needs an ingest token: put it in a file only the agent can "
                             "read and set FLEETSCOPE_INGEST_TOKEN_FILE (or systemd LoadCredential=ingest-token:<file>, "
                             "or FLEETSCOPE_INGEST_TOKEN), or give it a client certificate (--tls-cert, --tls-key)")
        if config.huge_pages and getattr(args, "is_program", False):
            # The settings are good and nothing has started or said a word: this process may now be replaced by the
            # same command on an interpreter with the malloc it needs (agent/hugepages.py).
            from agent.hugepages import reexec_for_malloc

            reexec_for_malloc()
        if not config.collector_url:
            logging.getLogger("fleetscope.agent").warning(
                "no collector_url: serving /metrics only; workload events and samples are not shipped")
        agent = Agent(config)
    except (ValueError, OSError) as exc:
        print(f"fleetscope agent: {exc}", file=sys.stderr)
        return 2
    agent.run_forever()
    return 0


def _collector(args: argparse.Namespace) -> int:
    from collector.settings import size_polars_pool

    size_polars_pool()  # before collector.main imports polars
    from collector.main import MAX_CONNECTIONS, run

    try:
        settings, listen = collector_settings(args)
    except (OSError, ValueError) as exc:
        print(f"fleetscope collector: {exc}", file=sys.stderr)
        return 2
    host, _, port = listen.rpartition(":")
    run(settings, host or "0.0.0.0", int(port), max_connections=args.max_connections or MAX_CONNECTIONS)
    return 0


def collector_settings(args: argparse.Namespace):
    """The collector's Settings and host:port from its flags, its config file and the environment (flags win over
    the file, which wins over the environment); ValueError or OSError saying what is wrong."""
    from collector.settings import Settings, load_config, parse_duration, parse_ingest_tokens, parse_size

    kwargs: dict[str, object] = {}
    listen = f"0.0.0.0:{COLLECTOR_PORT}"
    if args.config:
        kwargs, other = load_config(args.config)
        listen = str(other.get("listen", listen))
    # Flags win over the config file, which wins over the environment.
    for flag, name, parse in (("data_dir", "data_dir", lambda v, w: Path(v)), ("cluster", "cluster", lambda v, w: v),
                              ("memory_budget", "memory_budget", parse_size), ("window", "window_s", parse_duration),
                              ("raw_window", "raw_window_s", parse_duration), ("retention", "retention_s", parse_duration),
                              ("retention_bytes", "retention_bytes", parse_size),
                              ("raw_steps", "raw_steps", _positive_int),
                              ("checkpoint_interval", "checkpoint_interval_s", parse_duration),
                              ("analysis_interval", "analysis_interval_s", parse_duration),
                              ("maintenance_interval", "maintenance_interval_s", parse_duration),
                              ("max_points", "max_points", _positive_int),
                              ("max_body_bytes", "max_body_bytes", parse_size),
                              ("max_future_skew", "max_future_skew_s", parse_duration),
                              ("max_step_jump", "max_step_jump", _positive_int),
                              ("metrics_max_jobs", "metrics_max_jobs", _positive_int),
                              ("metrics_max_services", "metrics_max_services", _positive_int),
                              ("metrics_max_ranks", "metrics_max_ranks", _positive_int),
                              ("straggler_page_share", "straggler_page_share", _number),
                              ("ingest_processes", "ingest_processes", _whole),
                              ("tls_cert", "tls_cert", lambda v, w: Path(v)), ("tls_key", "tls_key", lambda v, w: Path(v)),
                              ("tls_client_ca", "tls_client_ca", lambda v, w: Path(v)),
                              ("web_config", "web_config", lambda v, w: Path(v))):
        value = getattr(args, flag)
        if value is not None:
            kwargs[name] = parse(value, f"--{flag.replace('_', '-')}")
    # Tokens from credential files or the environment (fleetscope/secrets.py), never from flags. Ingest tokens:
    # `<token>` (a fleet token) or `<token> <node>` (that agent's own), one a line (collector.settings).
    kwargs["ingest_tokens"], kwargs["agent_tokens"] = parse_ingest_tokens(read_secret("FLEETSCOPE_INGEST_TOKEN") or "",
                                                                          "the ingest-token credential")
    kwargs["read_tokens"] = read_secrets("FLEETSCOPE_READ_TOKEN")
    for name, env, credential, who in (("ingest_tokens", "FLEETSCOPE_INGEST_TOKEN", "ingest-token", "agents"),
                                       ("read_tokens", "FLEETSCOPE_READ_TOKEN", "read-token", "readers")):
        if name == "ingest_tokens" and (kwargs["agent_tokens"] or kwargs.get("tls_client_ca")):
            continue  # agents come with their own tokens or client certificates
        if not kwargs[name]:
            raise ValueError(f"no {credential}: put the token(s) {who} use in a file only the collector can read (one a "
                             f"line) and set {env}_FILE=<file>, or under systemd LoadCredential={credential}:<file>, "
                             f"or set {env}")
    if args.max_connections is not None and args.max_connections <= 0:
        raise ValueError(f"--max-connections must be positive, got {args.max_connections}")
    if kwargs.get("ingest_processes") is None:
        from collector.decoders import default_ingest_processes

        kwargs["ingest_processes"] = default_ingest_processes()
    settings = Settings(**kwargs)  # type: ignore[arg-type]
    return settings, args.listen or listen


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface): not known to be loopback


def _number(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {value!r}") from None


def _positive_int(value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {n}")
    return n


def _whole(value: str, what: str) -> int:
    """A whole number, 0 or more."""
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{what} must be 0 or more, got {n}")
    return n


def _dashboard(args: argparse.Namespace) -> int:
    # The console holds a read token and shows the whole fleet to whoever reaches it: without sign-in it
    # may listen on loopback only (reached through an SSH tunnel or an authenticating proxy).
    secrets_file = None
    if args.auth == "oidc":
        missing = [flag for flag, value in (("--oidc-issuer", args.oidc_issuer), ("--oidc-client-id", args.oidc_client_id),
                                            ("--public-url", args.public_url)) if not value]
        try:
            client_secret = read_secret("FLEETSCOPE_OIDC_CLIENT_SECRET")
        except SecretError as exc:
            print(f"fleetscope dashboard: {exc}", file=sys.stderr)
            return 2
        if not client_secret:
            missing.append("the client secret ($FLEETSCOPE_OIDC_CLIENT_SECRET_FILE or $FLEETSCOPE_OIDC_CLIENT_SECRET)")
        if missing:
            print(f"fleetscope dashboard: --auth oidc needs {', '.join(missing)}", file=sys.stderr)
            return 2
        from dashboards.auth import write_oidc_secrets

        secrets_file = write_oidc_secrets(args.oidc_issuer, args.oidc_client_id, client_secret, args.public_url)
    if args.auth == "none" and not _loopback(args.address) and not args.insecure:
        print(f"fleetscope dashboard: refusing to listen on {args.address or 'every interface'} without sign-in: anyone "
              "who can reach it would read the whole fleet with the console's read token. Listen on 127.0.0.1 (the default) "
              "and reach it through an SSH tunnel or an authenticating reverse proxy, or add --insecure if something "
              "in front of it already restricts who connects.", file=sys.stderr)
        return 2
    try:
        token = read_secret("FLEETSCOPE_READ_TOKEN")
    except SecretError as exc:
        print(f"fleetscope dashboard: {exc}", file=sys.stderr)
        return 2
    import dashboards

    app = Path(dashboards.__file__).parent / "app.py"
    env = dict(os.environ)
    # The console reads its token from its environment (readable by its own user only, unlike the command line).
    env.pop("FLEETSCOPE_READ_TOKEN_FILE", None)
    env.pop("FLEETSCOPE_OIDC_CLIENT_SECRET", None)
    env.pop("FLEETSCOPE_OIDC_CLIENT_SECRET_FILE", None)
    if token:
        env["FLEETSCOPE_READ_TOKEN"] = token
    env["FLEETSCOPE_CONSOLE_AUTH"] = args.auth
    if args.collector_url:
        env["FLEETSCOPE_COLLECTOR_URL"] = args.collector_url
    argv = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.port", str(args.port), "--server.address", args.address,
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
    ]
    if secrets_file is None:
        os.execve(sys.executable, argv, env)
        return 0  # not reached
    argv += ["--secrets.files", str(secrets_file)]  # st.login's [auth] settings, in a file only this user can read
    return _run_then_remove(argv, env, secrets_file.parent)


def _run_then_remove(argv: list[str], env: dict[str, str], folder: Path) -> int:
    """Run the console as a child and remove `folder` (its [auth] secrets: the OIDC client secret) once it has stopped,
    however it stops: an exec would leave the file behind at every start. SIGTERM, SIGINT and SIGHUP are passed on to
    it (systemd, Ctrl-C, a closed terminal); its exit status is this process's. Only SIGKILL of this process leaves the
    folder (0700, the file 0600), and `PrivateTmp=` takes it with the service."""
    import shutil
    import signal
    import subprocess

    try:
        child = subprocess.Popen(argv, env=env)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda received, _frame: child.send_signal(received))
        code = child.wait()
        return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _dashboards_push(args: argparse.Namespace) -> int:
    try:
        token = read_secret("GRAFANA_TOKEN")
    except SecretError as exc:
        print(f"fleetscope dashboards push: {exc}", file=sys.stderr)
        return 2
    if not token:
        print("fleetscope dashboards push: give a Grafana service-account token: a file named by $GRAFANA_TOKEN_FILE "
              "(or $GRAFANA_TOKEN)", file=sys.stderr)
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


def _rules(args: argparse.Namespace) -> int:
    if args.output is None:  # one file today; several would print one after the other, each a YAML document
        for i, path in enumerate(assets.rule_files()):
            sys.stdout.write(("---\n" if i else "") + path.read_text())
        return 0
    for path in assets.export_rules(Path(args.output)):
        print(path)
    return 0


def _dashboards_export(args: argparse.Namespace) -> int:
    for path in assets.export_dashboards(Path(args.folder)):
        print(path)
    return 0


def _agent_print_unit(args: argparse.Namespace) -> int:
    sys.stdout.write(assets.agent_unit_text(args.bin))
    here = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "fleetscope" else None
    target = Path(args.bin or assets.UNIT_EXEC)
    if here is not None and here != target.resolve():
        print(f"fleetscope agent print-unit: the unit runs {target}, not this fleetscope ({here}); --bin {here} "
              "points it here", file=sys.stderr)
    return 0


def _agent_print_config(args: argparse.Namespace) -> int:
    sys.stdout.write(assets.agent_config_example().read_text())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fleetscope.demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetscope", description="Monitoring for AI datacenters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level (default: info)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("agent", help="run the per-node agent")
    p.add_argument("--config", help="TOML file with an [agent] table")
    p.add_argument("--node", help="node name (default: hostname)")
    p.add_argument("--metrics-address", help=f"host:port for /metrics (default 0.0.0.0:{AGENT_METRICS_PORT})")
    p.add_argument("--events-address", help="where workloads send events: unix:/path (a Unix socket that tells the agent "
                   "each sender's real pid and uid), host:port (UDP), or one of each, comma-separated (default 127.0.0.1:9836)")
    p.add_argument("--interval", type=float, help="seconds between samples (default 5)")
    p.add_argument("--gpu-backend", choices=["auto", "nvml", "simulated", "none"],
                   help="where GPU readings come from: auto (NVML when its library is present), nvml, simulated "
                        "(see --gpus, --seed, --scenario) or none (default auto)")
    p.add_argument("--gpus", type=int, help="number of simulated GPUs (default 8)")
    p.add_argument("--seed", type=int, help="seed of the simulated GPUs")
    p.add_argument("--scenario", help="TOML fault scenario for simulated GPUs (see agent/gpu/scenario.py)")
    p.add_argument("--expected-gpus", type=int, help="GPUs this node should have")
    p.add_argument("--collector-url", help="collector base URL, e.g. http://collector:9837")
    _refuse_token_flag(p, "--collector-token", "agent", "FLEETSCOPE_INGEST_TOKEN")
    p.add_argument("--ca-file", help="CA certificate(s) (PEM) that an https collector URL's certificate must verify against "
                   "(default: the system's)")
    p.add_argument("--tls-cert", help="client certificate (PEM) to present to a mutual-TLS collector; its common name is "
                   "this node's identity")
    p.add_argument("--tls-key", help="the private key of --tls-cert (PEM), unless the certificate file holds it")
    p.add_argument("--web-config", help="Prometheus web configuration file (YAML, as node_exporter's --web.config.file): "
                   "tls_server_config and basic_auth_users for /metrics")
    p.add_argument("--spool-dir", help="where batches wait while the collector is unreachable (default: $STATE_DIRECTORY/spool)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="the node's place in the fleet, e.g. cluster=a rack=r12")
    p.add_argument("--compat", action="append", choices=["dcgm"], help="also emit another exporter's metric names (dcgm)")
    p.add_argument("--disable-source", action="append", help="source to disable (cpu, memory, storage, network, gpu)")
    p.add_argument("--pod-resources-socket", help="the kubelet's PodResources socket, for pod, namespace and container labels "
                   "on GPU series (default /var/lib/kubelet/pod-resources/kubelet.sock where it exists; \"\" for none)")
    p.set_defaults(func=_agent)
    # Without one of these the agent runs; they hand out what installing it as a service takes.
    agent_sub = p.add_subparsers(dest="agent_command", metavar="{print-unit,print-config}")
    q = agent_sub.add_parser("print-unit", help="print the agent's systemd unit (fleetscope-agent.service)")
    q.add_argument("--bin", help=f"the fleetscope command its ExecStart runs (default {assets.UNIT_EXEC})")
    q.set_defaults(func=_agent_print_unit)
    q = agent_sub.add_parser("print-config", help="print an example /etc/fleetscope/agent.toml")
    q.set_defaults(func=_agent_print_config)

    p = sub.add_parser("collector", help="run the central collector")
    p.add_argument("--listen", help=f"host:port to serve on (default 0.0.0.0:{COLLECTOR_PORT})")
    p.add_argument("--config", help="TOML file with a [collector] table (every setting below) and [[slo]] tables")
    p.add_argument("--data-dir", help="where the WAL and the Parquet history live (default: $FLEETSCOPE_DATA_DIR or .fleetscope/collector)")
    p.add_argument("--cluster", help="this cluster's name: a label on the collector's findings and job metrics")
    p.add_argument("--memory-budget", help="memory the collector keeps within, e.g. 2GiB (default: 2 GiB, or a quarter of RAM or half the cgroup's memory limit if less)")
    p.add_argument("--window", help="how long the hot tier keeps rollups, step aggregates and requests in memory (default 6h)")
    p.add_argument("--raw-window", help="how long raw GPU and host frames stay in memory (default 5m)")
    p.add_argument("--retention", help="how long history stays on disk (default 30d)")
    p.add_argument("--retention-bytes", help="most disk the history may use (default: 40%% of the data disk)")
    p.add_argument("--raw-steps", help="raw steps the hot tier keeps per rank, what the detectors look at (default 120)")
    p.add_argument("--checkpoint-interval", help="how often the WAL is written to Parquet (default 30s)")
    p.add_argument("--analysis-interval", help="how often the hot tier is tidied and stragglers, hangs and regressions "
                   "looked for (default 5s)")
    p.add_argument("--maintenance-interval", help="how often closed hours are compacted and retention applied (default 5m)")
    p.add_argument("--max-points", help="points per series a read answers at most (default 500)")
    p.add_argument("--max-body-bytes", help="the largest ingest body taken, 413 past it (default 16MiB)")
    p.add_argument("--max-future-skew", help="how far ahead of the collector's clock a record may be dated (default 10m)")
    p.add_argument("--max-step-jump", help="how far above its job and rank's highest step a step may jump (default 1000000)")
    p.add_argument("--metrics-max-jobs", help="jobs the collector's /metrics exports at most, troubled first (default 500)")
    p.add_argument("--metrics-max-services", help="service/model pairs /metrics exports at most (default 200)")
    p.add_argument("--metrics-max-ranks", help="ranks with a straggler score /metrics exports at most (default 1000)")
    p.add_argument("--straggler-page-share", help="a straggler pages when the other ranks wait this share of each "
                                                  "step for it, else it opens a ticket (default 0.05)")
    p.add_argument("--tls-cert", help="serve HTTPS only, with this certificate chain (PEM); plain HTTP is then refused")
    p.add_argument("--tls-key", help="the private key of --tls-cert (PEM), unless the certificate file holds it")
    p.add_argument("--tls-client-ca", help="mutual TLS: agents may present a client certificate signed by this CA (PEM); "
                   "its common name is the node they write as")
    p.add_argument("--web-config", help="Prometheus web configuration file (YAML): basic_auth_users for /metrics (then "
                   "a read token is not needed there); its tls_server_config is the server's TLS when --tls-cert is not given")
    p.add_argument("--ingest-processes", help="worker processes that decode ingest bodies, 0 for none (default: one "
                   "fewer than the CPUs, at most 4)")
    p.add_argument("--max-connections", type=int, help="open connections beyond which requests are answered 503 "
                   "(default 8192; every agent keeps one open)")
    _refuse_token_flag(p, "--ingest-token", "collector", "FLEETSCOPE_INGEST_TOKEN")
    _refuse_token_flag(p, "--read-token", "collector", "FLEETSCOPE_READ_TOKEN")
    p.set_defaults(func=_collector)

    p = sub.add_parser("dashboard", help="run the Streamlit console")
    p.add_argument("--port", type=int, default=CONSOLE_PORT, help=f"port to serve the console on (default {CONSOLE_PORT})")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another needs sign-in, --auth, or --insecure)")
    p.add_argument("--auth", choices=["none", "oidc"], default="none", help="who may see the console: none (no sign-in, "
                   "loopback only unless --insecure) or oidc (OpenID Connect sign-in through Streamlit's st.login)")
    p.add_argument("--oidc-issuer", help="--auth oidc: the provider's URL (its /.well-known/openid-configuration is read)")
    p.add_argument("--oidc-client-id", help="--auth oidc: the console's client id at the provider (the secret comes from "
                   "$FLEETSCOPE_OIDC_CLIENT_SECRET_FILE)")
    p.add_argument("--public-url", help="--auth oidc: where users reach the console, e.g. https://console.example:8501 "
                   "(the provider sends them back to <public-url>/oauth2callback)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --address without sign-in (only behind something that restricts who connects)")
    p.add_argument("--collector-url", help="collector base URL (default: $FLEETSCOPE_COLLECTOR_URL or http://127.0.0.1:9837)")
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("dashboards", help="Grafana dashboards")
    dash = p.add_subparsers(dest="dashboards_command", required=True)
    p = dash.add_parser("push", help="upload fleetscope's dashboards to a Grafana through its HTTP API")
    p.add_argument("--url", default=os.environ.get("GRAFANA_URL", "http://127.0.0.1:3000"),
                   help="Grafana's base URL (default: $GRAFANA_URL or http://127.0.0.1:3000); its API token in "
                        "$GRAFANA_TOKEN_FILE or $GRAFANA_TOKEN")
    _refuse_token_flag(p, "--token", "dashboards push", "GRAFANA_TOKEN")
    p.add_argument("--folder", default="fleetscope", help="folder to put them in (created when missing)")
    p.set_defaults(func=_dashboards_push)
    p = dash.add_parser("export", help="write fleetscope's Grafana dashboards (JSON) into a folder, e.g. for file provisioning")
    p.add_argument("folder", help="where to write them (created when missing)")
    p.set_defaults(func=_dashboards_export)

    p = sub.add_parser("rules", help="print the Prometheus alert rules, or write them with their runbooks into a folder")
    p.add_argument("--output", metavar="DIR", help="write fleetscope.rules.yml, runbooks/*.md and alertmanager.yml "
                   "(its receivers to fill: python -m alerts.render_alertmanager) into DIR instead of printing the rules")
    p.set_defaults(func=_rules)

    p = sub.add_parser("demo", help="run the whole platform on this machine on a simulated fleet")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--nodes", type=int, default=2, help="simulated nodes, one agent each")
    p.add_argument("--gpus", type=int, default=8, help="simulated GPUs per node")
    p.add_argument("--workdir", default=".fleetscope/demo", help="where the demo keeps its data and logs")
    p.add_argument("--no-console", action="store_true", help="do not start the Streamlit console")
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus/Alertmanager even if installed")
    p.set_defaults(func=_demo)
    return parser


# The third-party modules each command's extra brings (pyproject.toml), so that an install without the extra
# says which one to add rather than ending in a ModuleNotFoundError traceback.
_EXTRA_MODULES = {
    "agent": ("agent", {"pynvml", "psutil", "prometheus_client", "msgspec", "httpx", "yaml", "bcrypt", "grpc", "google"}),
    "collector": ("collector", {"fastapi", "uvicorn", "polars", "msgspec", "prometheus_client", "yaml", "bcrypt"}),
    "dashboard": ("dashboard", {"streamlit", "authlib", "polars", "httpx"}),
    "dashboards": ("grafana", {"grafana_client", "httpx", "yaml"}),
    "demo": ("all", {"pynvml", "psutil", "prometheus_client", "msgspec", "httpx", "yaml", "bcrypt", "fastapi", "uvicorn",
                     "polars", "streamlit", "authlib"}),
}


def _is_program(argv: list[str] | None) -> bool:
    """Whether these arguments are this process's own command line (its tail): then starting the process again
    from sys.orig_argv runs the same command. Not so when main() is called with other arguments in-process."""
    return argv is None or (len(argv) > 0 and sys.argv[-len(argv):] == list(argv))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.is_program = _is_program(argv)
    _logging(args.verbose)
    try:
        return args.func(args)
    except assets.AssetMissing as exc:  # an install without its rules, dashboards or unit: say which, not a traceback
        print(f"fleetscope {args.command}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra, modules = _EXTRA_MODULES.get(args.command, ("all", set()))
        if (exc.name or "").partition(".")[0] not in modules:
            raise
        print(f"fleetscope {args.command}: the Python module {exc.name!r} is not installed; this command needs the "
              f"'{extra}' extra: pip install 'fleetscope[{extra}]' (or the agent's Debian package)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
