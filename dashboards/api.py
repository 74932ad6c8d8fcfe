"""The console's only way to data: the collector's read API, with a read token."""

from __future__ import annotations

import os
import ssl
import time
from typing import Any
from urllib.parse import quote

import httpx
import polars as pl
import streamlit as st

from dashboards.auth import gate, md  # noqa: F401 - md is for the pages
from fleetscope.vocabulary import COLLECTOR_PORT


class CollectorError(Exception):
    """The collector could not answer; the message says what to check."""


class Collector:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 5.0) -> None:
        self.url = (url or os.environ.get("FLEETSCOPE_COLLECTOR_URL") or f"http://127.0.0.1:{COLLECTOR_PORT}").rstrip("/")
        token = token if token is not None else os.environ.get("FLEETSCOPE_READ_TOKEN", "")
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"},
                                   verify=verify_context())

    def get(self, path: str, **params: Any) -> dict:
        try:
            resp = self.client.get(path, params=params or None)
        except httpx.HTTPError as exc:
            raise CollectorError(f"cannot reach the collector at {self.url} ({exc}); is it running?") from None
        if resp.status_code in (401, 403):
            raise CollectorError(f"the collector refused the read token ({resp.status_code}): set FLEETSCOPE_READ_TOKEN")
        if resp.status_code == 404:
            return {}
        if resp.status_code >= 400:
            raise CollectorError(f"collector answered {resp.status_code} to {path}: {resp.text[:300]}")
        return resp.json()


def verify_context(ca_file: str | None = None) -> ssl.SSLContext:
    """What an https collector's certificate must verify against: the CA certificate(s) in `ca_file` or
    FLEETSCOPE_CA_FILE (PEM; a private CA such as the demo's), else the system's."""
    ca_file = ca_file or os.environ.get("FLEETSCOPE_CA_FILE") or None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CollectorError(f"FLEETSCOPE_CA_FILE={ca_file}: cannot load CA certificates from it ({exc}); "
                             "name a PEM file of CA certificates, or unset it for the system's") from None


@st.cache_resource(show_spinner=False)
def _shared(url: str, token: str) -> Collector:
    return Collector(url, token)


def get_collector() -> Collector:
    """One client (one connection pool) per console process, for the configured collector and token."""
    url = os.environ.get("FLEETSCOPE_COLLECTOR_URL") or f"http://127.0.0.1:{COLLECTOR_PORT}"
    return _shared(url, os.environ.get("FLEETSCOPE_READ_TOKEN", ""))


RANGES = {"15 minutes": 15, "1 hour": 60, "6 hours": 360, "24 hours": 1440, "7 days": 7 * 1440, "30 days": 30 * 1440}


def page(title: str) -> Collector:
    """Start a console page: its config and heading, the time range and refresh controls, the collector client."""
    st.set_page_config(page_title=f"fleetscope · {title}" if title != "fleetscope" else title, layout="wide")
    st.title(title)
    gate()  # nothing below is shown, or fetched, to a viewer who may not see it
    with st.sidebar:
        st.selectbox("Time range", list(RANGES), index=1, key="time_range")
        default = int(os.environ.get("FLEETSCOPE_CONSOLE_REFRESH_S", "30"))
        st.number_input("Refresh every (s, 0: never)", min_value=0, max_value=3600, value=default, step=10, key="refresh_s")
    return get_collector()


def minutes() -> float:
    """The time range the operator picked, in minutes."""
    return float(RANGES.get(st.session_state.get("time_range", "1 hour"), 60))


def since() -> float:
    """Start of the time range the operator picked, Unix seconds (the collector's `since`)."""
    return time.time() - minutes() * 60


def line_chart(frame: pl.DataFrame, y: list[str] | str, *, color: str | None = None, title: str = "") -> None:
    """A time series (column `ts`, Unix seconds) as an Altair line chart: one line per `color` value, or per
    column of `y`. Built directly, because st.line_chart spends hundreds of milliseconds reshaping."""
    import altair as alt

    columns = [y] if isinstance(y, str) else y
    long = frame.select(pl.from_epoch(pl.col("ts"), time_unit="s").alias("time"), *([color] if color else []), *columns)
    if color is None:
        long = long.unpivot(index="time", on=columns, variable_name="series", value_name="value")
        color, value = "series", "value"
    else:
        value = columns[0]
    chart = alt.Chart(long.to_pandas()).mark_line().encode(
        x=alt.X("time:T", title=None), y=alt.Y(f"{value}:Q", title=title or None), color=alt.Color(f"{color}:N", title=None))
    st.altair_chart(chart.properties(height=220), width="stretch")


def refresh() -> None:
    """Call at the end of a page: wait for the refresh interval, then run the page again."""
    seconds = int(st.session_state.get("refresh_s", 0) or 0)
    if seconds > 0:
        time.sleep(seconds)
        st.rerun()


def api_path(*segments: object) -> str:
    """An API path with each name (job, node, service: anything from the API or the user) quoted as one
    segment: a name with '/', '?' or '..' in it cannot reach another endpoint."""
    return "/" + "/".join(quote(str(s), safe="") for s in segments)


def fetch(collector: Collector, path: str, **params: Any) -> dict:
    """One API answer; on failure show why and stop the page."""
    try:
        return collector.get(path, **params)
    except CollectorError as exc:
        st.error(str(exc))
        st.stop()
        raise  # not reached: st.stop() ends the script run


def frames(collector: Collector, *queries: tuple) -> list[pl.DataFrame]:
    """Fetch (path, key[, params]) tables; on failure show why and stop the page."""
    out = []
    for path, key, *params in queries:
        rows = fetch(collector, path, **(params[0] if params else {})).get(key) or []
        out.append(pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame())
    return out


BADPUT_COLORS = {  # the reasons of GET /v1/jobs/{job}/goodput, productive first, in one colour each
    "productive": "#2ca02c", "recomputed": "#d62728", "checkpoint": "#1f77b4", "startup": "#9467bd", "hang": "#8c564b",
    "pause": "#17becf", "data_stall": "#ff7f0e", "straggler_wait": "#e377c2",
}


def goodput(collector: Collector, job: str, max_points: int = 200) -> tuple[dict, pl.DataFrame]:
    """A job's goodput over its whole life, and its breakdown over time long: (time, reason, gpu_hours)."""
    answer = fetch(collector, api_path("v1", "jobs", job, "goodput"), max_points=max_points)
    rows = answer.get("over_time") or []
    if not rows:
        return answer, pl.DataFrame(schema={"time": pl.Datetime("ms", "UTC"), "reason": pl.String, "gpu_hours": pl.Float64})
    series = (pl.DataFrame(rows).unpivot(index="ts", variable_name="reason", value_name="gpu_s")
              .select(pl.from_epoch(pl.col("ts").cast(pl.Int64), time_unit="s").dt.replace_time_zone("UTC").alias("time"),
                      "reason", (pl.col("gpu_s") / 3600).alias("gpu_hours")))
    return answer, series


# --- inference -----------------------------------------------------------------------------------------------
def as_times(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """Unix-seconds columns as UTC datetimes, so a table shows times and not epoch floats."""
    present = [c for c in columns if c in frame.columns]
    return frame.with_columns(pl.from_epoch(pl.col(c).cast(pl.Float64) * 1000, time_unit="ms").dt.replace_time_zone("UTC")
                              for c in present)


def service_series(collector: Collector, service: str, by: str = "model") -> tuple[pl.DataFrame, pl.DataFrame]:
    """A service over the picked time range (GET /v1/services/{service}/series): its latency quantiles and rates
    per model or node (`by`), and its servers' state (KV cache, queue, preemptions, prefix-cache hits)."""
    answer = fetch(collector, api_path("v1", "services", service, "series"), since=since(), by=by)
    series = pl.DataFrame(answer.get("series") or [], infer_schema_length=None)
    state = pl.DataFrame(answer.get("server_state") or [], infer_schema_length=None)
    return series, state


def long_series(frame: pl.DataFrame, key: str, columns: dict[str, str]) -> pl.DataFrame:
    """(ts, series, value) for line_chart(..., color="series"): one line per `key` value and column, named
    "<key value> <label>"; rows without a value are left out."""
    present = {c: label for c, label in columns.items() if c in frame.columns}
    if frame.height == 0 or not present:
        return pl.DataFrame(schema={"ts": pl.Float64, "series": pl.String, "value": pl.Float64})
    return (frame.unpivot(index=["ts", key], on=list(present), variable_name="column", value_name="value")
            .drop_nulls("value")
            .select("ts", pl.concat_str(pl.col(key).cast(pl.String), pl.lit(" "),
                                        pl.col("column").replace_strict(present, return_dtype=pl.String)).alias("series"),
                    pl.col("value").cast(pl.Float64)))
