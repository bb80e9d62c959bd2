"""The real-host path, in the namespace lab: the iptables/ scripts applied by
hand and the daemons started by hand (not through `lab up`) carry a
connection through a primary crash."""

import os
import subprocess
import sys
import time

from nfq_sttcp import control, lab, scenario

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_scripts_and_daemons_by_hand_survive_a_crash(make_lab):
    cfg = make_lab(start_daemons=False)
    env = os.path.join(ROOT, "iptables", "lab.env")
    for role, ns in (("primary", lab.NS_PRIMARY), ("backup", lab.NS_BACKUP)):
        r = subprocess.run(["ip", "netns", "exec", ns, os.path.join(ROOT, "iptables", "apply"), role, "--env", env],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "applied %s rules" % role in r.stdout, r.stderr
    daemons = []
    for role, ns in (("primary", lab.NS_PRIMARY), ("backup", lab.NS_BACKUP)):
        log = open(os.path.join(lab.STATE_DIR, "logs", "%s-daemon.log" % role), "ab")
        daemons.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "nfq_sttcp", role,
                                         "--config", lab.config_path()], stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 20
    while True:
        try:
            if control.request(cfg.control_socket("backup"))["state"] == "following" and \
                    control.request(cfg.control_socket("primary"))["backup"] == "present":
                break
        except (OSError, ValueError):
            pass
        assert all(d.poll() is None for d in daemons), "a daemon started by hand exited"
        assert time.monotonic() < deadline, "the daemons started by hand never paired"
        time.sleep(0.05)
    r = scenario.run_with_crash(["download:bytes=%d,crash_at=%d" % (20 << 20, 8 << 20),
                                 "echo:count=20,size=2000,pause_ms=10,crash_msg=5,after=5"])
    for c in r["connections"]:
        assert c["ok"] and c["rsts_received"] == 0 and c["syns_sent"] == 1, c
    assert lab.status()["daemons"]["backup"]["state"] == "active"
