"""The Prometheus endpoint (``metrics_port`` in the config).

The HTTP server runs in prometheus-client's thread; it never touches the
daemon's live state. The daemon's loop publishes a status snapshot (a plain
dict, replaced whole) about once a second, and each scrape reads the latest.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from .control import DEGRADED, DOWN, HEALTHY, health, summarize

# Failover phases, in seconds: detection (last beat to declared failed),
# takeover (declared to held segments released), resume (declared to the
# first client segment after takeover).
FAILOVER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
VERDICTS = ("accept", "drop", "defer", "release", "inject")
REWRITE_ERRORS = ("handler_errors", "malformed_in", "bad_checksum_in", "malformed_out", "inject_errors")


def _histogram(values: list[float]) -> tuple[list[tuple[str, float]], float]:
    buckets = [(repr(b), float(sum(1 for v in values if v <= b))) for b in FAILOVER_BUCKETS]
    buckets.append(("+Inf", float(len(values))))
    return buckets, float(sum(values))


class StatusCollector:
    """Turns a daemon status snapshot into metric families."""

    def __init__(self, snapshot: Callable[[], Optional[dict[str, Any]]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        st = self.snapshot()
        if st is None:
            return
        counters = st.get("counters", {})
        info = GaugeMetricFamily("nfq_sttcp_state", "The daemon's role and state (1 for the current one)",
                                 labels=["role", "state", "serving_as"])
        info.add_metric([st["role"], str(st.get("state")), str(st.get("serving_as", st["role"]))], 1)
        yield info
        judged, _why = health(st)
        well = GaugeMetricFamily("nfq_sttcp_health", "The daemon's health as `nfq-sttcp status` judges it (1 for "
                                 "the current one): healthy, degraded or down", labels=["health"])
        for name in (HEALTHY, DEGRADED, DOWN):
            well.add_metric([name], 1 if name == judged else 0)
        yield well
        big = GaugeMetricFamily("nfq_sttcp_oversize_link", "1 for each link now set to carry packets over 64 KB "
                                "(BIG TCP): its connections go unprotected", labels=["interface"])
        for ifname in st.get("oversize_links", []):
            big.add_metric([ifname], 1)
        yield big
        packets = CounterMetricFamily("nfq_sttcp_packets", "Packets handled, by verdict", labels=["verdict"])
        for v in VERDICTS:
            packets.add_metric([v], counters.get("verdict_" + v, 0))
        yield packets
        errors = CounterMetricFamily("nfq_sttcp_rewrite_errors", "Packets that could not be parsed, rewritten or "
                                     "sent (given the role's safe verdict)", labels=["kind"])
        for k in REWRITE_ERRORS:
            errors.add_metric([k], counters.get(k, 0))
        yield errors
        kdrops = CounterMetricFamily("nfq_sttcp_kernel_drops", "Packets the kernel dropped before they reached a "
                                     "handler: the queue was full, or the daemon's socket was", labels=["reason"])
        for reason in ("queue_full", "socket_full"):
            kdrops.add_metric([reason], counters.get("kernel_%s_drops" % reason, 0))
        yield kdrops
        # (a status lists at most 1,000 connections; its summary counts all)
        summary = st.get("summary") or summarize(st.get("connections", []))
        held = GaugeMetricFamily("nfq_sttcp_held_bytes", "Bytes of the backup's replies held until takeover")
        held.add_metric([], summary["held_bytes"])
        yield held
        protected = GaugeMetricFamily("nfq_sttcp_connections", "Tracked connections", labels=["protected"])
        protected.add_metric(["true"], summary["protected"])
        protected.add_metric(["false"], summary["unprotected"])
        yield protected
        beats = st.get("heartbeats", {})
        if "rtt_ms" in beats:
            rtt = GaugeMetricFamily("nfq_sttcp_heartbeat_rtt_seconds", "Latest heartbeat round trip")
            rtt.add_metric([], beats["rtt_ms"] / 1000)
            yield rtt
        failovers = st.get("failovers", [])
        total = CounterMetricFamily("nfq_sttcp_failovers", "Takeovers by this daemon")
        total.add_metric([], len(failovers))
        yield total
        for phase in ("detection", "takeover", "resume"):
            values = [f[phase] for f in failovers if f.get(phase) is not None]
            h = HistogramMetricFamily("nfq_sttcp_failover_%s_seconds" % phase, "Failover %s time" % phase)
            buckets, total_s = _histogram(values)
            h.add_metric([], buckets, total_s)
            yield h
        div = CounterMetricFamily("nfq_sttcp_divergences", "Connections whose output differed from the primary's")
        div.add_metric([], counters.get("diverged", 0))
        yield div
        rej = CounterMetricFamily("nfq_sttcp_sync_rejected", "Sync messages rejected (bad, forged or replayed)")
        rej.add_metric([], counters.get("sync_rejected", 0))
        yield rej


def serve(port: int, address: str, snapshot: Callable[[], Optional[dict[str, Any]]]) -> Any:
    """Start the endpoint in a daemon thread; returns the server (``shutdown()`` it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(snapshot))
    result = start_http_server(port, addr=address, registry=registry)
    return result[0] if isinstance(result, tuple) else None
