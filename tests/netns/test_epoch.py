"""A daemon's epoch outgrows its last life's even when the clock says
otherwise: its peer refuses a smaller one as a replay of an earlier life.

The clock cannot be stepped back here (every process shares it), so the
test makes the backup's last life an hour ahead of the clock instead: its
epoch file says so. The restart after that is, to the primary, a daemon
whose clock went back an hour across its restart."""

import os
import signal
import time

from nfq_sttcp import lab, scenario

from .checks import survived

MB = 1 << 20
HOUR_NS = 3600 * 10**9


def _stop_backup():
    lab.kill_daemon("backup", signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and lab.control("primary")["backup"] == "present":
        time.sleep(0.05)
    assert lab.control("primary")["backup"] != "present", "the primary still sees the stopped backup"
    while time.monotonic() < deadline:
        try:
            lab.control("backup", timeout=0.5)
        except OSError:
            return  # its control socket is gone: the daemon has ended
        time.sleep(0.05)
    raise AssertionError("the backup's daemon did not stop")


def _kept(path):
    with open(path) as f:
        return int(f.read())


def test_a_backup_restarted_with_its_clock_behind_its_last_life_is_followed_again(make_lab):
    cfg = make_lab()
    path = os.path.join(cfg.state_dir, "epoch-%s" % cfg.backup_sync)
    first = _kept(path)
    assert abs(first - time.time_ns()) < 600 * 10**9, "the first life's epoch is its start time"

    _stop_backup()
    with open(path, "w") as f:
        f.write("%d\n" % (time.time_ns() + HOUR_NS))  # a last life an hour ahead
    lab.start_backup_daemon(progress=lambda *_: None)
    ahead = _kept(path)
    assert ahead > time.time_ns() + HOUR_NS // 2

    _stop_backup()
    lab.start_backup_daemon(progress=lambda *_: None)  # the primary must see it present: else a LabError
    assert _kept(path) == ahead + 1, "this life's epoch follows the last, not the clock"
    primary = lab.control("primary")
    assert primary["backup"] == "present"
    assert primary["counters"].get("sync_replayed", 0) == 0, primary["counters"]
    with open(os.path.join(lab.STATE_DIR, "logs", "backup-daemon.log")) as f:
        assert "clock_behind_last_epoch" in f.read()

    # And it protects: a download survives the primary's crash.
    r = scenario.run_with_crash(["download:bytes=%d,rate_kbps=100000,crash_at=%d" % (12 * MB, 4 * MB)])
    survived(r, {"download": 12 * MB})
