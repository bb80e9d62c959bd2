"""After a failover the old primary rejoins as the backup of the host that
took over: connections born after it joined are protected, and a second
failover carries them back; connections migrated earlier are reported
unprotected."""

import subprocess
import sys

import pytest

from nfq_sttcp import lab, scenario

from .checks import EchoProbe, survived

MB = 1 << 20

def _conn(status, port):
    return [c for c in status["connections"] if c["conn"].startswith("%s:%d " % (lab.CLIENT_IP, port))]


@pytest.mark.parametrize("fast_path", [False, True])
def test_a_rejoined_backup_protects_new_connections_through_a_second_failover(make_lab, fast_path):
    make_lab(fast_path=fast_path)
    probe = EchoProbe()
    try:
        assert probe.ping("before the first failover") == "ok"
        first = scenario.run_with_crash(["echo:count=20,size=2000,pause_ms=20,crash_msg=5,after=5"])
        survived(first)
        assert probe.ping("migrated to the backup") == "ok"

        # The crashed host comes back. As a primary it would claim the VIP
        # the backup now serves: its daemon refuses, and claims nothing.
        lab.reboot("primary")
        r = subprocess.run(["ip", "netns", "exec", lab.NS_PRIMARY, sys.executable, "-m", "nfq_sttcp", "primary",
                            "--config", lab.config_path(), "--control-socket", "/run/nfq-sttcp-lab/ctl/x.sock"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 4 and "serves the VIP (it took over)" in r.stderr, (r.returncode, r.stderr)
        assert lab.vip_owner() == ["backup"]
        lab.rejoin("primary", progress=lambda *_: None)
        serving = lab.control("backup")
        assert serving["serving_as"] == "primary" and serving["backup"] == "present", serving
        migrated = _conn(serving, probe.port)
        assert migrated and not migrated[0]["protected"] and "migrated" in migrated[0]["reason"], migrated
        assert probe.ping("still served after the rejoin") == "ok"
    finally:
        probe.close()

    seen = {}

    def before_second_crash():
        seen["serving"] = lab.control("backup")
        seen["new_backup"] = lab.control("primary")

    # Bulk paced: unpaced, 20 MB are over in ~0.1 s, before the echo reaches
    # its crash point, and then nothing of them is mid-stream at the crash.
    second = scenario.run_with_crash(["download:bytes=%d,rate_kbps=100000,crash_at=%d" % (20 * MB, 6 * MB),
                                      "upload:bytes=%d,rate_kbps=100000,crash_at=%d" % (20 * MB, 6 * MB),
                                      "echo:count=30,size=3000,pause_ms=20,crash_msg=8,after=10"],
                                     crash_host="backup", before_crash=before_second_crash)
    for c in second["connections"]:
        mine = _conn(seen["serving"], c["local_port"])
        assert mine and mine[0]["protected"], (c["kind"], mine)
        theirs = _conn(seen["new_backup"], c["local_port"])
        assert theirs, "the new backup never saw %s" % c["kind"]
        # The host that took over serves without a fast path (it loads none),
        # so it sends digests of every connection, whatever its config says.
        assert theirs[0]["output_checked"], (c["kind"], theirs)
    survived(second, {"download": 20 * MB, "upload": 20 * MB}, serving="primary")


def test_switchover_hands_over_at_once_and_leaves_the_old_primary_fenced(make_lab):
    make_lab()
    report = scenario.run_with_crash(["download:bytes=%d,rate_kbps=100000,crash_at=%d" % (20 * MB, 6 * MB),
                                      "upload:bytes=%d,rate_kbps=100000,crash_at=%d" % (20 * MB, 6 * MB),
                                      "echo:count=30,size=3000,pause_ms=20,crash_msg=8,after=10",
                                      "banner:lines=30,pause_ms=20,crash_line=8,after=10"],
                                     disrupt=lambda: lab.switchover(progress=lambda *_: None)[1:])
    backup = survived(report, {"download": 20 * MB, "upload": 20 * MB})
    # No detection wait: the backup took over on the primary's word.
    assert backup["failover"]["reason"] == "the primary stepped down (switchover)", backup["failover"]
    gaps = [c["wire_gap_ms"] for c in report["connections"]]
    print("switchover gaps (ms): %s; detection time %d ms" % (gaps, backup["detection_ms"]))
    # The old primary's daemon exited and left its replies fenced.
    assert not lab.sh("pgrep", "-f", "nfq_sttcp --log-format json -v primary", ns=lab.NS_PRIMARY, check=False).stdout
    rules = lab.sh("iptables-save", "-t", "mangle", ns=lab.NS_PRIMARY).stdout
    assert "-j DROP" in rules and "NFQUEUE" not in rules, rules
    assert lab.vip_owner() == ["backup"]
