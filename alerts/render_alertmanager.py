"""Print alerts/alertmanager.yml with the receivers' placeholder URLs filled from the environment.

    FLEETSCOPE_PAGE_WEBHOOK_URL=https://... FLEETSCOPE_TICKET_WEBHOOK_URL=https://... \\
        python -m alerts.render_alertmanager > /etc/prometheus/alertmanager.yml
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "alertmanager.yml"
PLACEHOLDERS = {
    "http://127.0.0.1:9/fleetscope-page-webhook-placeholder": "FLEETSCOPE_PAGE_WEBHOOK_URL",
    "http://127.0.0.1:9/fleetscope-ticket-webhook-placeholder": "FLEETSCOPE_TICKET_WEBHOOK_URL",
}


def render(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    missing = [name for name in PLACEHOLDERS.values() if not env.get(name)]
    if missing:
        raise SystemExit(f"render_alertmanager: set {', '.join(missing)} (the receivers' webhook URLs)")
    text = TEMPLATE.read_text()
    for placeholder, name in PLACEHOLDERS.items():
        text = text.replace(placeholder, env[name])
    return text


if __name__ == "__main__":
    sys.stdout.write(render())
