"""keepalived's VRRP owns the VIP instead of the built-in watchdog: real
keepalived (Debian's package) in the primary and backup namespaces, adverts
over the lab LAN, its notify hook driving the daemons."""

import json
import os

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
