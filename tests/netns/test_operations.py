"""What an operator sees: `nfq-sttcp status` and its exit code, the
Prometheus endpoint, and the failover timeline in the log."""

import json
import os
import subprocess
import sys
import time

from nfq_sttcp import driver, lab, scenario

from .checks import big_tcp, intact

CLI = [sys.executable, "-m", "nfq_sttcp"]


def status_cli(host):
    r = subprocess.run(CLI + ["status", "--config", lab.config_path(), "--control-socket", lab.control_path(host),
                              "--json"], capture_output=True, text=True)
    return r.returncode, json.loads(r.stdout)


def scrape(host):
    code = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:%d/metrics', timeout=5)"
            ".read().decode())" % lab.METRICS_PORT)
    r = subprocess.run(["ip", "netns", "exec", lab.HOSTS[host], sys.executable, "-c", code],
                       capture_output=True, text=True, check=True)
    samples = {}
    for line in r.stdout.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_status_metrics_and_the_failover_timeline(make_lab):
    make_lab()
    rc, st = status_cli("primary")
    assert (rc, st["health"], st["backup"]) == (0, "healthy", "present"), st
    rc, st = status_cli("backup")
    assert (rc, st["health"], st["state"]) == (0, "healthy", "following"), st
    assert st["heartbeats"]["rtt_ms"] > 0, st["heartbeats"]
    # Without --role or --control-socket: the daemon of the host asked from,
    # though both hosts' sockets sit in one directory (the primary's answers first)
    for host in ("backup", "primary"):
        r = subprocess.run(["ip", "netns", "exec", lab.HOSTS[host]] + CLI + [
            "status", "--config", lab.config_path(), "--json"], capture_output=True, text=True)
        assert json.loads(r.stdout)["role"] == host, r.stdout[:300]

    deadline = time.monotonic() + 5
    m = scrape("primary")
    while "nfq_sttcp_heartbeat_rtt_seconds" not in m and time.monotonic() < deadline:
        time.sleep(0.3)  # the snapshot behind the endpoint is refreshed every second
        m = scrape("primary")
    assert m['nfq_sttcp_state{role="primary",serving_as="primary",state="serving"}'] == 1
    assert m['nfq_sttcp_health{health="healthy"}'] == 1 and m['nfq_sttcp_health{health="degraded"}'] == 0
    assert m["nfq_sttcp_heartbeat_rtt_seconds"] > 0
    assert m["nfq_sttcp_failovers_total"] == 0

    r = scenario.run_with_crash(["echo:count=30,size=1000,pause_ms=20,crash_msg=10,after=15",
                                 "download:bytes=4000000,rate_kbps=20000,crash_at=1000000"])
    intact(r)
    # the backup serves alone now: degraded (no backup of its own), and says why
    rc, st = status_cli("backup")
    assert (rc, st["health"]) == (1, "degraded"), st
    assert any("no backup follows" in w for w in st["why"]), st["why"]
    time.sleep(1.3)  # the snapshot the endpoint serves is refreshed every second
    m = scrape("backup")
    assert m["nfq_sttcp_failovers_total"] == 1
    assert m["nfq_sttcp_failover_detection_seconds_count"] == 1
    assert m["nfq_sttcp_failover_resume_seconds_count"] == 1
    assert 0 < m["nfq_sttcp_failover_resume_seconds_sum"] < 5
    assert m['nfq_sttcp_packets_total{verdict="accept"}'] > 0
    assert m['nfq_sttcp_packets_total{verdict="inject"}'] > 0
    # The two migrated connections (no backup holds their state now) have
    # ended; they linger 30 s, shown as closed and not counted as unprotected.
    rc, st = _status_until("backup", lambda rc, st: st["summary"].get("closed", 0) >= 2, 10)
    migrated = [c for c in st["connections"] if c["conn"].endswith((":7000", ":7001"))]
    assert len(migrated) == 2 and all(c["closed"] and not c["protected"] for c in migrated), migrated
    assert st["summary"]["unprotected"] == 0 and not any("unprotected" in w for w in st["why"]), st
    assert rc == 1 and st["why"] == ["no backup follows (backup absent)"], st["why"]
    time.sleep(1.3)
    m = scrape("backup")
    assert m['nfq_sttcp_connections{protected="false"}'] == 0, m
    # a crashed primary's endpoint is gone with it: nothing answers for a dead host
    r = subprocess.run(CLI + ["status", "--config", lab.config_path(), "--control-socket", lab.control_path("primary")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "down: no daemon answers" in r.stderr, (r.returncode, r.stderr)

    with open(os.path.join(lab.STATE_DIR, "logs", "backup-daemon.log")) as f:
        events = [json.loads(line) for line in f if line.startswith("{")]
    timeline = [e for e in events if e["event"] == "failover_timeline"]
    assert len(timeline) == 1, [e["event"] for e in events]
    steps = timeline[0]["timeline_ms"]
    assert list(steps) == ["suspected", "declared_failed", "vip_moved", "garp_sent", "held_released",
                           "first_client_segment"], steps
    assert all(a <= b for a, b in zip(list(steps.values()), list(steps.values())[1:])), steps
    assert all(e.get("role") == "backup" for e in events)
    print("failover timeline (ms from suspicion): %s" % steps)


def _status_until(host, done, timeout):
    deadline = time.monotonic() + timeout
    while True:
        rc, st = status_cli(host)
        if done(rc, st) or time.monotonic() > deadline:
            return rc, st
        time.sleep(0.5)


def test_a_link_raised_to_big_tcp_while_serving_turns_the_status_degraded_until_set_back(make_lab):
    make_lab()
    rc, st = status_cli("primary")
    assert rc == 0 and "oversize_links" not in st, st
    ns = lab.HOSTS["primary"]
    try:
        big_tcp(ns, lab.LAN_IF, 196608)  # refused at start; here raised under a running daemon
        rc, st = _status_until("primary", lambda rc, st: "oversize_links" in st, 4 * driver.SIZES_RECHECK_S)
        assert rc == 1 and st["health"] == "degraded" and st["oversize_links"] == [lab.LAN_IF], st
        assert any("BIG TCP packets over 64 KB on lan0" in w for w in st["why"]), st["why"]
        assert st["counters"]["packet_sizes_raised"] == 1
        assert status_cli("backup")[0] == 0, "the backup's links were not touched"
        shown = subprocess.run(CLI + ["lab", "status"], capture_output=True, text=True).stdout
        assert "primary: DEGRADED: BIG TCP packets over 64 KB on lan0" in shown, shown
        time.sleep(1.3)  # the snapshot the endpoint serves is refreshed every second
        m = scrape("primary")
        assert m['nfq_sttcp_oversize_link{interface="lan0"}'] == 1 and m['nfq_sttcp_health{health="degraded"}'] == 1
    finally:
        big_tcp(ns, lab.LAN_IF, 65536)
    rc, st = _status_until("primary", lambda rc, st: rc == 0, 4 * driver.SIZES_RECHECK_S)
    assert rc == 0 and "oversize_links" not in st, st
    assert st["counters"]["packet_sizes_raised"] == 1, "one error for one change, not one per recheck"
    time.sleep(1.3)
    m = scrape("primary")
    assert m['nfq_sttcp_health{health="healthy"}'] == 1 and not any(k.startswith("nfq_sttcp_oversize_link") for k in m)
