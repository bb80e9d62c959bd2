"""A non-deterministic application (it answers with the time and random
bytes): the backup notices that its copy writes other bytes, the connection
is reported unprotected on both sides, and at a failover the client gets a
clean reset, never a byte the primary did not send."""

import os
import sys
import time

from nfq_sttcp import lab

from .checks import EchoProbe

APP = os.path.join(os.path.dirname(__file__), "apps", "clock_server.py")


def _conn(status, port):
    return [c for c in status["connections"] if c["conn"].startswith("%s:%d " % (lab.CLIENT_IP, port))]


def test_a_diverging_connection_is_unprotected_and_reset_at_failover(make_lab):
    out = os.path.join(lab.STATE_DIR, "clock")
    make_lab(app="%s %s %s" % (sys.executable, APP, out), ports=(7010,))
    probe = EchoProbe(7010)
    try:
        got = ""
        for i in range(10):
            reply = probe.request("what time is it %d" % i)
            assert not reply.startswith("ERR"), reply
            got += reply
            time.sleep(0.02)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            backup, primary = _conn(lab.control("backup"), probe.port), _conn(lab.control("primary"), probe.port)
            if backup and primary and not backup[0]["protected"] and not primary[0]["protected"]:
                break
            time.sleep(0.05)
        assert backup and backup[0]["reason"].startswith("diverged"), backup
        assert primary and primary[0]["reason"].startswith("diverged"), primary
        assert lab.control("backup")["counters"].get("diverged", 0) >= 1
        primary_sent = open(out + "-primary.out").read()
        backup_wrote = open(out + "-backup.out").read()
        assert primary_sent != backup_wrote[:len(primary_sent)]  # the test really diverges

        lab.crash("primary")
        time.sleep(0.5)
        after = probe.request("and now?")
        # The client is reset (at once, or when its next segment meets the
        # backup's reset); it never reads a byte the primary did not send.
        assert after.startswith("ERR ConnectionResetError") or after.startswith("ERR EOFError"), after
        assert primary_sent.startswith(got), "the client got bytes the primary never sent"
        assert lab.control("backup")["counters"].get("unprotected_reset", 0) >= 1
    finally:
        probe.close()
