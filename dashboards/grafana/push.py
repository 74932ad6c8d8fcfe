"""Upload the dashboards in dashboards/grafana/*.json to a running Grafana (grafana-client)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError

HERE = Path(__file__).resolve().parent


def push(url: str, token: str, *, folder: str = "fleetscope") -> Iterator[tuple[str, str]]:
    """Create the folder if needed and create or overwrite each dashboard; yields (title, its URL)."""
    api = GrafanaApi.from_url(url=url, credential=token)
    try:
        existing = {f["title"]: f["uid"] for f in api.folder.get_all_folders()}
        if folder in existing:
            folder_uid = existing[folder]
        else:
            folder_uid = api.folder.create_folder(folder)["uid"]
    except GrafanaClientError as exc:
        raise RuntimeError(f"Grafana at {url} refused to list or create folder {folder!r}: {exc}") from None
    for path in sorted(HERE.glob("*.json")):
        doc = json.loads(path.read_text())
        doc.pop("id", None)
        result = api.dashboard.update_dashboard({"dashboard": doc, "folderUid": folder_uid, "overwrite": True,
                                                 "message": "fleetscope dashboards push"})
        yield doc["title"], url.rstrip("/") + result.get("url", "")
