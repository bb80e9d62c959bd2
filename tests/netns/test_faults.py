"""The wrong thing dies: the backup host, a handler, or the sync link.

In none of these may the client see an error, a reset or a wrong byte, and
the VIP must never have two owners. The README's split-brain policy: the
backup takes over only when heartbeats stop on both paths (sync link and
LAN) *and* the primary's host stops answering ICMP on the LAN.
"""

import subprocess
import time

from nfq_sttcp import lab, scenario
from nfq_sttcp.primary import REASON_BACKUP_LOST

from .checks import intact

MB = 1 << 20
MIXED = ["download:bytes=%d,rate_kbps=40000,crash_at=%d" % (12 * MB, 3 * MB),
         "upload:bytes=%d,rate_kbps=40000,crash_at=%d" % (12 * MB, 3 * MB),
         "echo:count=40,size=2000,pause_ms=20,crash_msg=10,after=20",
         "banner:lines=40,pause_ms=20,crash_line=10,after=20"]
EXPECT = {"download": 12 * MB, "upload": 12 * MB}


def _client_conns(status, report):
    ports = {c["local_port"] for c in report["connections"]}
    return [c for c in status["connections"]
            if c["conn"].startswith(lab.CLIENT_IP + ":") and int(c["conn"].split()[0].split(":")[1]) in ports]


def _primary_served_alone(report, reason):
    """The primary still serves, alone, every connection unprotected for ``reason``."""
    st = lab.control("primary")
    intact(report, EXPECT, st)
    assert lab.vip_owner() == ["primary"]
    assert st["backup"] == "absent", st
    conns = _client_conns(st, report)
    assert len(conns) == len(report["connections"]), conns
    assert all(not c["protected"] and c["reason"] == reason for c in conns), conns
    print("client gaps across the fault (ms): %s" % {c["kind"]: c["wire_gap_ms"] for c in report["connections"]})
    return st


def test_the_backup_host_dies_and_the_primary_serves_on_unprotected(make_lab):
    make_lab()
    r = scenario.run_with_crash(MIXED, crash_host="backup")
    _primary_served_alone(r, REASON_BACKUP_LOST)


def test_a_killed_backup_daemon_never_lets_a_backup_segment_reach_the_client(make_lab):
    make_lab()
    backup_mac = lab.mac("backup")
    # Everything the backup's interface sends that reaches the client.
    cap = subprocess.Popen(["ip", "netns", "exec", lab.NS_CLIENT, "tcpdump", "-i", lab.CLIENT_IF, "-n", "-e", "-l",
                            "ether src %s" % backup_mac], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    try:
        r = scenario.run_with_crash(["download:bytes=%d,rate_kbps=16000,crash_at=%d" % (30 * MB, 4 * MB),
                                     "echo:count=40,size=2000,pause_ms=250,crash_msg=5,after=40"],
                                    disrupt=lambda: lab.kill_daemon("backup"))
        # A positive control: the capture does see what the backup host sends
        # (its own address answers; only the VIP's replies are fenced).
        assert lab.exec_in("client", ["python3", "-c", "import socket; socket.create_connection(('%s', 7000), "
                                      "timeout=3).close()" % lab.BACKUP_IP]) == 0
        time.sleep(1.0)
    finally:
        cap.terminate()
        out, _ = cap.communicate(timeout=10)
    watched = time.monotonic() - r["crash_t"]
    st = lab.control("primary")
    intact(r, {"download": 30 * MB}, st)
    lines = out.splitlines()
    from_vip = [l for l in lines if "%s." % lab.VIP in l.split(" > ")[0]]
    assert any("%s.7000 > " % lab.BACKUP_IP in l for l in lines), "the capture saw nothing from the backup:\n%s" % out
    assert not from_vip, "backup segments reached the client:\n%s" % "\n".join(from_vip[:10])
    assert watched >= 10, "the client was watched only %.1f s after the kill" % watched
    print("watched %.1f s after the kill; frames from the backup's MAC: %d, TCP from the VIP among them: 0"
          % (watched, len(lines)))
    assert st["backup"] == "absent" and lab.vip_owner() == ["primary"]


def test_a_killed_primary_daemon_leaves_the_service_running_and_protection_lost(make_lab):
    make_lab()
    r = scenario.run_with_crash(MIXED, disrupt=lambda: lab.kill_daemon("primary"))
    st = lab.control("backup")
    intact(r, EXPECT, st)
    # The primary's host answers the backup's probes: its service runs on
    # (fail-open), so the backup must not take the VIP.
    assert st["state"] == "orphaned", st["state"]
    assert lab.vip_owner() == ["primary"]
    conns = _client_conns(st, r)
    assert conns and all(not c["protected"] and "silent" in c["reason"] for c in conns), conns
    print("client gaps across the kill (ms): %s" % {c["kind"]: c["wire_gap_ms"] for c in r["connections"]})


def _cut_sync_link():
    t, wall = time.monotonic(), time.time()
    lab.sh("ip", "link", "set", "bs0", "down", ns=lab.NS_SYNC)
    return t, wall


def test_split_brain_sync_link_cut_the_lan_heartbeat_keeps_the_backup_back(make_lab):
    make_lab()
    r = scenario.run_with_crash(MIXED, disrupt=_cut_sync_link)
    _primary_served_alone(r, REASON_BACKUP_LOST)
    st = lab.control("backup")
    assert st["state"] == "following", st["state"]  # it still hears the primary over the LAN


def _block_heartbeats():
    """Both heartbeat paths cut (the sync port dropped both ways on the
    backup), while the primary's host stays reachable on the LAN."""
    t, wall = time.monotonic(), time.time()
    for chain, flag in (("INPUT", "--dport"), ("OUTPUT", "--dport"), ("INPUT", "--sport")):
        lab.sh("iptables", "-w", "-I", chain, "1", "-p", "udp", flag, "7788", "-j", "DROP", ns=lab.NS_BACKUP)
    return t, wall


def test_split_brain_both_heartbeat_paths_cut_the_host_probe_keeps_the_backup_back(make_lab):
    make_lab()
    r = scenario.run_with_crash(MIXED, disrupt=_block_heartbeats)
    _primary_served_alone(r, REASON_BACKUP_LOST)
    st = lab.control("backup")
    assert st["state"] == "orphaned", st["state"]
