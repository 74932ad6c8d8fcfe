"""Print alerts/alertmanager.yml with the receivers' placeholder URLs filled from the environment.

    FLEETSCOPE_PAGE_WEBHOOK_URL=https://... FLEETSCOPE_TICKET_WEBHOOK_URL=https://... \\
        python -m alerts.render_alertmanager > /etc/prometheus/alertmanager.yml

Each URL may come from a file instead (FLEETSCOPE_PAGE_WEBHOOK_URL_FILE=<file>, as tokens do: a webhook URL
often carries a key), and `--output FILE` writes the result atomically (the compose stack's
alertmanager-config service does both, from the template mounted with `--template`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from fleetscope.secrets import SecretError, read_secret

TEMPLATE = Path(__file__).resolve().parent / "alertmanager.yml"
PLACEHOLDERS = {
    "http://127.0.0.1:9/fleetscope-page-webhook-placeholder": "FLEETSCOPE_PAGE_WEBHOOK_URL",
    "http://127.0.0.1:9/fleetscope-ticket-webhook-placeholder": "FLEETSCOPE_TICKET_WEBHOOK_URL",
}


def _urls(env: dict[str, str]) -> dict[str, str]:
    # Literal names, so that the reference (tools/gen_reference.py) sees both variables and their _FILE forms.
    try:
        found = {"FLEETSCOPE_PAGE_WEBHOOK_URL": read_secret("FLEETSCOPE_PAGE_WEBHOOK_URL", env),
                 "FLEETSCOPE_TICKET_WEBHOOK_URL": read_secret("FLEETSCOPE_TICKET_WEBHOOK_URL", env)}
    except SecretError as exc:
        raise SystemExit(f"render_alertmanager: {exc}") from None
    missing = [name for name, url in found.items() if not url]
    if missing:
        raise SystemExit(f"render_alertmanager: set {', '.join(missing)} (the receivers' webhook URLs), "
                         f"or {', '.join(m + '_FILE' for m in missing)} (a file holding it)")
    for name, url in found.items():
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
            raise SystemExit(f"render_alertmanager: {name} must be an http:// or https:// URL, got {url!r}")
    return found  # type: ignore[return-value]


def render(env: dict[str, str] | None = None, template: Path = TEMPLATE) -> str:
    env = dict(os.environ if env is None else env)
    urls = _urls(env)
    text = template.read_text()
    for placeholder, name in PLACEHOLDERS.items():
        if placeholder not in text:
            raise SystemExit(f"render_alertmanager: {template} has no receiver URL {placeholder} to fill; is it the "
                             "project's alerts/alertmanager.yml?")
        text = text.replace(placeholder, urls[name])
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alerts.render_alertmanager", description=__doc__.splitlines()[0])
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="the routing to fill (default: this package's alertmanager.yml)")
    parser.add_argument("--output", type=Path, help="write here (atomically) instead of printing")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    text = render(template=args.template)
    if args.output is None:
        sys.stdout.write(text)
        return
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
