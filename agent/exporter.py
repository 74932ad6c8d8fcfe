"""Prometheus exposition of the latest snapshot plus the agent's own health; a scrape never touches a source."""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.exposition import render
from agent.sampler import Sampler
from agent.sources.base import Family, Reading, by_family


class Provider(Protocol):
    """Anything with metric families and current readings (the listener, the shipper)."""

    families: tuple[Family, ...]

    def readings(self) -> Iterable[Reading]: ...


AGENT_FAMILIES = (
    Family("fleetscope_agent_build_info", "gauge", "The agent's version; the value is always 1.", ("version",)),
    Family("fleetscope_agent_source_up", "gauge", "1 when the source's last collection succeeded, 0 when it failed or had no data.", ("source",)),
    Family("fleetscope_agent_source_duration_seconds", "gauge", "How long the source's last collection took.", ("source",)),
    Family("fleetscope_agent_source_error", "gauge",
           "1 when the source's last collection failed with an error, overran its deadline, or reports a problem "
           "(not merely absent hardware).", ("source",)),
    Family("fleetscope_agent_source_problem", "gauge",
           "1 for each problem a source reports while it runs (e.g. a driver/library mismatch, a kernel log it may not read).",
           ("source", "problem")),
    Family("fleetscope_agent_last_sample_timestamp_seconds", "gauge", "Unix time of the latest snapshot."),
)


def build_families(families: Sequence[Family], readings: Iterable[Reading]) -> list[Metric]:
    """Group readings into Prometheus metric families; families with no reading are left out."""
    out: list[Metric] = []
    for fam, rows in by_family(families, readings):
        # prometheus_client names every counter's samples `_total`; a counter named without it (dcgm-exporter's
        # DCGM_FI_* under --compat dcgm) keeps its name only as untyped here. It cannot honour value_format
        # either: the served /metrics is agent.exposition.render's, which keeps both.
        untyped = fam.kind == "untyped" or (fam.kind == "counter" and not fam.name.endswith("_total"))
        if untyped:
            metric: Metric = Metric(fam.name, fam.help, "unknown")
        elif fam.kind == "counter":
            metric = CounterMetricFamily(fam.name.removesuffix("_total"), fam.help, labels=fam.labels)
        else:
            metric = GaugeMetricFamily(fam.name, fam.help, labels=fam.labels)
        for r in rows:
            labels = dict(r.labels)
            values = [labels.get(name, "") for name in fam.labels]
            if untyped:
                metric.add_sample(fam.name, dict(zip(fam.labels, values)), r.value)
            else:
                metric.add_metric(values, r.value)
        out.append(metric)
    return out


class AgentCollector:
    """A prometheus_client custom collector over the sampler's latest snapshot."""

    def __init__(self, sampler: Sampler, providers: Sequence[Provider] = (), version: str = "",
                 labels: dict[str, str] | None = None) -> None:
        self.sampler = sampler
        self.providers = list(providers)
        self.version = version
        self.labels = dict(sorted((labels or {}).items()))
        self.families: list[Family] = list(AGENT_FAMILIES)
        if self.labels:
            self.families.append(Family("fleetscope_node_info", "gauge",
                                        "The node's place in the fleet, from the agent's configuration; the value is always 1.",
                                        tuple(self.labels)))
        seen = {f.name for f in self.families}
        for source in sampler.sources:
            for fam in source.families:
                if fam.name not in seen:
                    seen.add(fam.name)
                    self.families.append(fam)
        for provider in self.providers:
            self.families.extend(provider.families)

    def _own_readings(self) -> list[Reading]:
        """The agent's own series, then the snapshot's (added to the list whole, not yielded one by one)."""
        out = [Reading("fleetscope_agent_build_info", 1.0, (("version", self.version),))]
        if self.labels:
            out.append(Reading("fleetscope_node_info", 1.0, tuple(self.labels.items())))
        snapshot = self.sampler.latest
        if snapshot is None:
            return out
        out.append(Reading("fleetscope_agent_last_sample_timestamp_seconds", snapshot.ts))
        for name, st in snapshot.status.items():
            source = (("source", name),)
            out.append(Reading("fleetscope_agent_source_up", 1.0 if st.up else 0.0, source))
            out.append(Reading("fleetscope_agent_source_duration_seconds", st.duration_s, source))
            failed = (not st.up and not st.no_data) or bool(st.problems)
            out.append(Reading("fleetscope_agent_source_error", 1.0 if failed else 0.0, source))
            for problem in st.problems:
                out.append(Reading("fleetscope_agent_source_problem", 1.0, (("source", name), ("problem", problem))))
        out += snapshot.readings
        return out

    def readings(self) -> list[Reading]:
        readings = self._own_readings()
        for provider in self.providers:
            readings.extend(provider.readings())
        return readings

    def collect(self) -> Iterable[Metric]:
        return build_families(self.families, self.readings())

    def render(self) -> bytes:
        """The exposition text, as generate_latest would write it, without its per-object cost."""
        return render(self.families, self.readings())


def make_registry(collector: AgentCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
