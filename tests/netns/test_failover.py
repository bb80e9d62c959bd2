"""A primary crash mid-stream, end to end, for every kind of traffic.

Each case checks byte-exact content (every byte compared, or the sink's
sha256), and from the client's own capture that it saw no RST and sent no
second SYN (no reconnect)."""

import glob
import os
import subprocess
import sys
import tempfile
import time

import pytest

from nfq_sttcp import lab, scenario
from nfq_sttcp.promoted import REASON_MIGRATED

from .checks import survived

MB = 1 << 20


def test_echo_crash_between_messages(make_lab):
    make_lab()
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "sttcp-cap-*")))
    r = scenario.run_with_crash(["echo:count=30,size=3000,pause_ms=20,crash_msg=8,after=10"])
    survived(r)
    # The client's capture was read and is gone: nothing left in /tmp.
    assert r["captured_segments"] > 0 and r["capture"] is None
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "sttcp-cap-*"))) == before


def test_echo_crash_inside_a_message(make_lab):
    make_lab()
    r = scenario.run_with_crash(["echo:count=30,size=65536,pause_ms=20,crash_msg=8,inside=1,after=10"])
    survived(r)


def test_bulk_download_50mb(make_lab):
    make_lab()
    for host in ("primary", "backup"):  # whole GSO packets, 64 KB copies (nfqueue.py)
        queues = lab.control(host)["queues"]
        assert queues and all(q["copy_range"] == 65531 and q["whole_gso"] for q in queues.values()), queues
    r = scenario.run_with_crash(["download:bytes=%d,crash_at=%d" % (50 * MB, 15 * MB)])
    survived(r, {"download": 50 * MB})


def test_bulk_upload_50mb_sink_hash_matches(make_lab):
    make_lab()
    r = scenario.run_with_crash(["upload:bytes=%d,crash_at=%d" % (50 * MB, 15 * MB)])
    survived(r, {"upload": 50 * MB})


def test_server_speaks_first_banner(make_lab):
    make_lab()
    r = scenario.run_with_crash(["banner:lines=30,pause_ms=20,crash_line=8,after=10"])
    survived(r)


def test_backup_application_slower_than_the_primary(make_lab):
    # 100 ms per echo response and per MiB of bulk data, on the backup only.
    make_lab(app="%s -m nfq_sttcp.testapp --backup-delay-ms 100" % sys.executable)
    r = scenario.run_with_crash([
        "echo:count=20,size=2000,pause_ms=10,crash_msg=6,after=5",
        "download:bytes=%d,crash_at=%d" % (20 * MB, 6 * MB),
    ])
    survived(r, {"download": 20 * MB})


def test_twenty_concurrent_connections_all_mid_stream(make_lab):
    conns = []
    for i in range(5):
        conns.append("echo:count=20,size=1500,pause_ms=20,crash_msg=5,after=10,seed=%d" % i)
        conns.append("banner:lines=20,pause_ms=20,crash_line=5,after=10")
        conns.append("download:bytes=%d,rate_kbps=16000,crash_at=%d,seed=%d" % (6 * MB, MB // 2, i + 10))
        conns.append("upload:bytes=%d,rate_kbps=16000,crash_at=%d,seed=%d" % (6 * MB, MB // 2, i + 20))
    make_lab()
    r = scenario.run_with_crash(conns)
    assert len(r["connections"]) == 20
    backup = survived(r)
    # Once taken over, a connection is served but no longer protected.
    assert sum(1 for c in backup["connections"] if c["reason"] == REASON_MIGRATED) >= 20


def test_two_percent_loss_on_the_clone_path_during_upload(make_lab):
    make_lab()
    rc = subprocess.call(["ip", "netns", "exec", lab.NS_BACKUP, "iptables", "-w", "-t", "raw", "-I", "PREROUTING", "1",
                          "-i", lab.SYNC_IF, "-p", "tcp", "-m", "statistic", "--mode", "random",
                          "--probability", "0.02", "-j", "DROP"])
    assert rc == 0
    r = scenario.run_with_crash(["upload:bytes=%d,crash_at=%d" % (20 * MB, 8 * MB)])
    survived(r, {"upload": 20 * MB})
    out = subprocess.run(["ip", "netns", "exec", lab.NS_BACKUP, "iptables", "-w", "-t", "raw", "-L", "PREROUTING",
                          "-v", "-x", "-n"], capture_output=True, text=True).stdout
    dropped = int([l for l in out.splitlines() if "statistic" in l][0].split()[0])
    assert dropped > 0, "the loss rule dropped nothing: the test proved nothing"


def test_connection_opened_before_the_backup_is_unprotected_and_untouched(make_lab):
    make_lab(start_backup=False)
    # A long echo session in the client's namespace; the backup starts in its middle.
    p = subprocess.Popen(["ip", "netns", "exec", lab.NS_CLIENT, "python3", "-c", """
import socket, sys, time
s = socket.create_connection(("10.77.0.100", 7000), timeout=10)
for i in range(60):
    msg = (b"%03d" % i) * 300
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        d = s.recv(65536)
        if not d:
            sys.exit("EOF")
        got += d
    if got != msg:
        sys.exit("mismatch at message %d" % i)
    if i == 5:
        print("OPEN", s.getsockname()[1], flush=True)
        sys.stdin.readline()
    time.sleep(0.02)
print("DONE", flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert line and line[0] == "OPEN", line
    port = int(line[1])
    lab.start_backup_daemon(progress=lambda *_: None)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "DONE"
    assert p.wait(30) == 0
    st = lab.status()
    conns = {c["conn"]: c for c in st["daemons"]["primary"]["connections"]}
    mine = conns["10.77.0.10:%d -> 10.77.0.100:7000" % port]
    assert mine["protected"] is False
    assert mine["reason"] == "opened before the backup joined"
    assert mine["acks_clamped"] == 0
    assert st["daemons"]["backup"]["counters"].get("unknown_in", 0) > 0


SHUT_WINDOW_CLIENT = r"""
import socket, sys, time
from nfq_sttcp.testapp import stream_bytes
n = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
s.connect((sys.argv[2], 7001))
s.sendall(b"%d 5\n" % n)
got = bytearray()
while len(got) < 200000:
    got += s.recv(65536)
time.sleep(1.0)  # stop reading: the window shuts
print("shut", flush=True)
sys.stdin.readline()
s.setblocking(False)
try:
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += d
except BlockingIOError:
    pass
print("read", flush=True)  # the window update this sent was lost
sys.stdin.readline()
s.setblocking(True)
s.settimeout(30)
try:
    while len(got) < n:
        d = s.recv(65536)
        if not d:
            break
        got += d
except OSError as e:
    print("ERR %s after %d bytes" % (type(e).__name__, len(got)), flush=True)
print("done %d %s" % (len(got), got == stream_bytes(5, 0, n)), flush=True)
"""


@pytest.mark.parametrize("lost_for_s", [0.5, 2.5])
def test_a_window_update_lost_at_takeover_does_not_stall_a_shut_window(make_lab, lost_for_s):
    """The client's window is shut at the crash; it reads, and its window
    update is lost on the way (as when its ARP entry still names the dead
    primary). Within the gratuitous-ARP schedule our own window probe draws
    the window; after it, our stack's zero-window probes do. Before, both
    were absorbed by the client and the transfer stalled for good."""
    make_lab()
    n = 2 * MB
    p = subprocess.Popen(["ip", "netns", "exec", lab.NS_CLIENT, sys.executable, "-c", SHUT_WINDOW_CLIENT, str(n),
                          lab.VIP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "shut"
        lab.crash("primary")
        drop = ["OUTPUT", "-d", lab.VIP, "-p", "tcp", "-j", "DROP"]
        lab.sh("iptables", "-w", "-I", *drop, ns=lab.NS_CLIENT)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "read"
        deadline = time.monotonic() + 5
        while lab.status()["daemons"].get("backup", {}).get("state") != "active" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(lost_for_s)
        lab.sh("iptables", "-w", "-D", *drop, ns=lab.NS_CLIENT)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "done %d True" % n
    finally:
        p.kill()
        p.wait()
    st = lab.control("backup")
    assert st["state"] == "active"
    if lost_for_s < 2.0:
        assert st["counters"].get("window_probes", 0) > 0
