"""keepalived's VRRP owns the VIP instead of the built-in watchdog: real
keepalived (Debian's package) in the primary and backup namespaces, adverts
over the lab LAN, its notify hook driving the daemons."""

import json
import os
import signal
import time

from nfq_sttcp import lab, scenario

from .checks import survived


def test_keepalived_moves_the_vip_and_the_connections_survive(make_lab):
    make_lab(keepalived=True)
    assert lab.vip_owner() == ["primary"]
    assert lab.control("backup")["state"] == "following"
    r = scenario.run_with_crash(["echo:count=30,size=1000,pause_ms=20,crash_msg=10,after=15",
                                 "download:bytes=6000000,rate_kbps=20000,crash_at=1000000",
                                 "upload:bytes=6000000,rate_kbps=20000,crash_at=1000000"])
    backup = survived(r)
    assert "keepalived" in backup["failover"]["reason"], backup["failover"]
    with open(os.path.join(lab.STATE_DIR, "logs", "backup-daemon.log")) as f:
        events = [json.loads(line) for line in f if line.startswith("{")]
    notes = [e["vrrp_state"] for e in events if e["event"] == "keepalived_notify"]
    assert notes[-1] == "MASTER", notes
    # the built-in watchdog never took over by itself: only keepalived's word did
    assert not any(e["event"] == "watchdog_transition" and e.get("new") == "takeover"
                   and "keepalived" not in str(e.get("reason")) for e in events)


def test_a_backup_daemon_that_missed_the_master_notify_serves_all_the_same(make_lab):
    """keepalived runs its notify once per change. The backup's daemon is
    down when its host becomes MASTER (its notify finds no daemon); started
    again, it must see what MASTER means (the VIP on its LAN interface) and
    serve, not hold its application's replies on the host clients now reach."""
    make_lab(keepalived=True)
    lab.kill_daemon("backup")  # SIGKILL: its rules stay, the backup's replies go nowhere
    lab.crash("primary")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and lab.vip_owner() != ["backup"]:
        time.sleep(0.05)
    assert lab.vip_owner() == ["backup"], "keepalived on the backup never became MASTER"
    lab.spawn_backup_daemon()
    deadline = time.monotonic() + 20
    st = {}
    while time.monotonic() < deadline:
        try:
            st = lab.control("backup")
        except Exception:  # (not up yet)
            st = {}
        if st.get("state") in ("active", "fault"):
            break
        time.sleep(0.1)
    assert st.get("state") == "active", st
    # (Not by a late notify: keepalived retries nothing, but its one call may
    # still be on its way when the daemon starts.)
    assert "the VIP is on" in st["failover"]["reason"], st["failover"]
    r = scenario.run_with_crash(["echo:count=5,size=100,pause_ms=10,crash_msg=2,after=3"], crash=False, timeout=30)
    c = r["connections"][0]
    assert r["ok"] and c["ok"] and c["syns_sent"] == 1 and c["rsts_received"] == 0, r


def test_a_vip_put_on_the_backups_lan_by_hand_never_makes_it_take_over_from_a_live_primary(make_lab):
    """What MASTER means on the backup (the VIP on its LAN interface) also
    happens by hand, or is left by a keepalived killed with -9: while the
    primary's heartbeats go on, the backup says so and stays a backup."""
    make_lab(keepalived=True)
    cfg = lab.load_config()
    lab.sh("ip", "addr", "add", "%s/%d" % (cfg.vip, cfg.lan_prefix), "dev", cfg.lan_interface, ns=lab.NS_BACKUP)
    try:
        time.sleep(2.0)  # (four looks)
        assert lab.control("backup")["state"] == "following"
        with open(os.path.join(lab.STATE_DIR, "logs", "backup-daemon.log")) as f:
            events = [json.loads(line)["event"] for line in f if line.startswith("{")]
        assert "vip_on_lan_while_primary_heard" in events and "keepalived_master_seen" not in events
    finally:
        lab.sh("ip", "addr", "del", "%s/%d" % (cfg.vip, cfg.lan_prefix), "dev", cfg.lan_interface, ns=lab.NS_BACKUP,
               check=False)


def test_a_serving_daemon_that_missed_its_notify_fences_itself_when_the_peer_serves(make_lab):
    """keepalived takes the VIP off the serving host's LAN, but its notify
    never reaches the daemon (here: keepalived killed with -9, the VIP then
    taken off by hand). The backup's keepalived becomes MASTER and its daemon
    serves; the old primary's daemon must see the VIP gone and its peer
    serving, and fence itself, not serve on beside it."""
    make_lab(keepalived=True)
    cfg = lab.load_config()
    # Every keepalived process of the primary's, stopped before any is
    # killed: its VRRP child, left alone when its parent dies, shuts down
    # cleanly (the VIP removed, the notify run), which is not this case.
    pids = [int(p) for p in lab.sh("ip", "netns", "pids", lab.NS_PRIMARY).stdout.split()]
    keepalived = [p for p in pids if open("/proc/%d/comm" % p).read().strip() == "keepalived"]
    assert len(keepalived) >= 2, keepalived
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in keepalived:
            os.kill(pid, sig)  # no notify, and the VIP stays where it was
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and lab.control("backup")["state"] != "active":
        time.sleep(0.05)  # (the backup's keepalived, MASTER, told its daemon)
    assert lab.control("backup")["state"] == "active"
    log = os.path.join(lab.STATE_DIR, "logs", "primary-daemon.log")
    with open(log) as f:
        assert not any('"keepalived_notify"' in line for line in f), "a notify reached the primary's daemon"
    lab.sh("ip", "addr", "del", "%s/%d" % (cfg.vip, cfg.lan_prefix), "dev", cfg.lan_interface, ns=lab.NS_PRIMARY)
    deadline = time.monotonic() + 15
    events = []
    while time.monotonic() < deadline:
        with open(log) as f:
            events = [json.loads(line) for line in f if line.startswith("{")]
        if any(e["event"] == "fenced_after_switchover" for e in events):
            break
        time.sleep(0.1)
    gone = [e for e in events if e["event"] == "keepalived_vip_gone"]
    assert gone and gone[-1]["peer_serves"] is True, [e["event"] for e in events][-20:]
    assert any(e["event"] == "fenced_after_switchover" for e in events)  # the daemon exited, fence kept
    # The old primary's replies from the VIP are dropped: its fence is in.
    rules = lab.sh("iptables-save", "-t", "mangle", ns=lab.NS_PRIMARY).stdout.splitlines()
    fence = [line for line in rules if ("-s %s/32" % cfg.vip) in line and line.endswith("-j DROP")
             and "-m bpf" not in line]
    assert fence and not any("NFQUEUE" in line for line in rules), rules
    r = scenario.run_with_crash(["echo:count=5,size=100,pause_ms=10,crash_msg=2,after=3"], crash=False, timeout=30)
    assert r["ok"] and r["connections"][0]["rsts_received"] == 0, r



def _events(host):
    with open(os.path.join(lab.STATE_DIR, "logs", "%s-daemon.log" % host)) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def _echo_works():
    r = scenario.run_with_crash(["echo:count=3,size=100,pause_ms=10,crash_msg=1,after=2"], crash=False, timeout=20)
    c = (r.get("connections") or [{}])[0]
    return bool(r.get("ok") and c.get("ok") and c.get("rsts_received") == 0)


def test_a_keepalived_flap_leaves_the_service_where_the_vip_is(make_lab):
    """keepalived 2.2.7 answers a VIP removed by hand from the MASTER by going
    BACKUP, then MASTER again. The BACKUP notify makes the primary step down;
    the backup must not take over on that alone (its keepalived never became
    MASTER: the VIP stays with the primary), so the step down times out and
    the primary serves again, where the VIP is. Before, the backup took over
    without the VIP and the service went dark."""
    make_lab(keepalived=True)
    cfg = lab.load_config()
    lab.sh("ip", "addr", "del", "%s/%d" % (cfg.vip, cfg.lan_prefix), "dev", cfg.lan_interface, ns=lab.NS_PRIMARY)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(e["event"] == "switchover_failed" for e in _events("primary")):
        time.sleep(0.1)
    names = [e["event"] for e in _events("primary")]
    assert "switchover_started" in names and "switchover_failed" in names, names[-12:]
    assert lab.vip_owner() == ["primary"] and lab.control("backup")["state"] == "following"
    assert lab.control("primary")["state"] == "serving"
    assert _echo_works()


def test_stopping_keepalived_on_the_serving_host_hands_over(make_lab):
    """The planned way with keepalived: stop it where the service runs. The
    primary steps down on the STOP notify, the backup takes over on its own
    MASTER (not on the primary's stepping down), the primary exits fenced."""
    make_lab(keepalived=True)
    pids = [int(p) for p in lab.sh("ip", "netns", "pids", lab.NS_PRIMARY).stdout.split()]
    for pid in pids:
        if open("/proc/%d/comm" % pid).read().strip() == "keepalived":
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(e["event"] == "fenced_after_switchover" for e in _events("primary")):
        time.sleep(0.1)
    assert any(e["event"] == "fenced_after_switchover" for e in _events("primary"))
    st = lab.control("backup")
    assert st["state"] == "active" and "MASTER" in st["failover"]["reason"], st.get("failover")
    assert lab.vip_owner() == ["backup"]
    assert _echo_works()
