"""The Prometheus collector reads a daemon's status snapshot (no HTTP here;
the netns tests scrape the real endpoint)."""

from prometheus_client import CollectorRegistry, generate_latest

from nfq_sttcp.metrics import StatusCollector

SNAPSHOT = {
    "role": "backup", "state": "active", "serving_as": "primary",
    "counters": {"verdict_accept": 10, "verdict_drop": 4, "verdict_inject": 2, "malformed_in": 1, "kernel_queue_full_drops": 86, "diverged": 3,
                 "sync_rejected": 7},
    "heartbeats": {"rtt_ms": 0.25},
    "connections": [{"protected": True, "held_bytes": 100}, {"protected": False, "held_bytes": 50},
                    {"protected": False}],
    "failovers": [{"detection": 0.152, "takeover": 0.009, "resume": 0.04}],
}


def scrape(snapshot):
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(lambda: snapshot))
    return generate_latest(reg).decode()


def value(text, sample):
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError("no sample %s in:\n%s" % (sample, text))


def test_every_promised_metric_is_exposed_with_its_value():
    t = scrape(SNAPSHOT)
    assert value(t, 'nfq_sttcp_packets_total{verdict="accept"}') == 10
    assert value(t, 'nfq_sttcp_packets_total{verdict="drop"}') == 4
    assert value(t, 'nfq_sttcp_packets_total{verdict="defer"}') == 0
    assert value(t, 'nfq_sttcp_rewrite_errors_total{kind="malformed_in"}') == 1
    assert value(t, 'nfq_sttcp_kernel_drops_total{reason="queue_full"}') == 86
    assert value(t, 'nfq_sttcp_kernel_drops_total{reason="socket_full"}') == 0
    assert value(t, "nfq_sttcp_held_bytes") == 150
    assert value(t, 'nfq_sttcp_connections{protected="true"}') == 1
    assert value(t, 'nfq_sttcp_connections{protected="false"}') == 2
    assert value(t, "nfq_sttcp_heartbeat_rtt_seconds") == 0.00025
    assert value(t, "nfq_sttcp_failovers_total") == 1
    assert value(t, 'nfq_sttcp_failover_detection_seconds_bucket{le="0.1"}') == 0
    assert value(t, 'nfq_sttcp_failover_detection_seconds_bucket{le="0.2"}') == 1
    assert value(t, "nfq_sttcp_failover_takeover_seconds_count") == 1
    assert abs(value(t, "nfq_sttcp_failover_resume_seconds_sum") - 0.04) < 1e-9
    assert value(t, "nfq_sttcp_divergences_total") == 3
    assert value(t, "nfq_sttcp_sync_rejected_total") == 7
    assert value(t, 'nfq_sttcp_state{role="backup",serving_as="primary",state="active"}') == 1
    # serving with 2 connections unprotected and no backup heard of: degraded, not healthy
    assert value(t, 'nfq_sttcp_health{health="degraded"}') == 1
    assert value(t, 'nfq_sttcp_health{health="healthy"}') == 0 and value(t, 'nfq_sttcp_health{health="down"}') == 0
    assert "nfq_sttcp_oversize_link{" not in t


def test_health_and_oversize_links_follow_the_snapshot():
    following = {"role": "backup", "state": "following", "counters": {}, "connections": [{"protected": True}]}
    t = scrape(following)
    assert value(t, 'nfq_sttcp_health{health="healthy"}') == 1 and value(t, 'nfq_sttcp_health{health="degraded"}') == 0
    t = scrape(dict(following, oversize_links=["lan0", "sync0"]))
    assert value(t, 'nfq_sttcp_health{health="degraded"}') == 1
    assert value(t, 'nfq_sttcp_oversize_link{interface="lan0"}') == 1
    assert value(t, 'nfq_sttcp_oversize_link{interface="sync0"}') == 1
    t = scrape(dict(following, state="fault"))
    assert value(t, 'nfq_sttcp_health{health="down"}') == 1 and value(t, 'nfq_sttcp_health{health="healthy"}') == 0


def test_before_the_first_snapshot_and_without_optional_fields():
    assert scrape(None) == ""
    t = scrape(dict(SNAPSHOT, summary={"protected": 4000, "unprotected": 7, "held_bytes": 9}))
    assert value(t, "nfq_sttcp_connections{protected=\"true\"}") == 4000 and value(t, "nfq_sttcp_held_bytes") == 9
    t = scrape({"role": "primary", "state": "serving", "counters": {}, "connections": []})
    assert "nfq_sttcp_heartbeat_rtt_seconds" not in t  # no peer heard yet: no figure rather than a made-up one
    assert value(t, "nfq_sttcp_failovers_total") == 0
    assert value(t, "nfq_sttcp_failover_resume_seconds_count") == 0
