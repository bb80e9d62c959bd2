"""Packets the kernel drops before a handler sees them are counted and
reported: a full queue on the fail-closed backup loses clones silently
otherwise (its only trace is in /proc/net/netfilter/nfnetlink_queue)."""

import json
import os
import signal
import subprocess
import time

from nfq_sttcp import lab

from .checks import start_backup_with

CONNS = 150


def test_a_full_backup_queue_is_counted_and_logged_and_no_client_byte_is_lost(make_lab):
    # A slow heartbeat: the backup is frozen for a moment below, and must not
    # be declared lost (or declare the primary dead) for it.
    make_lab(start_backup=False, interval_ms=500, missed=6)
    start_backup_with(r"^max_len = \d+$", "max_len = 64", "[queues] max_len")
    client = subprocess.Popen(["ip", "netns", "exec", lab.NS_CLIENT, "python3", "-c", """
import socket, sys, time
n = int(sys.argv[1])
socks = []
for i in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("10.77.0.100", 7000))
    socks.append(s)
print("SENT", flush=True)
sys.stdin.readline()
bad = 0
for i, s in enumerate(socks):
    s.settimeout(20)
    msg = b"conn %d " % i * 50
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        d = s.recv(65536)
        if not d:
            break
        got += d
    bad += got != msg
    s.close()
print("BAD", bad, flush=True)
""", str(CONNS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        lab.kill_daemon("backup", signal.SIGSTOP)  # 150 SYN clones meet a queue that holds 64
        try:
            assert client.stdout.readline().strip() == "SENT"
            time.sleep(0.3)
        finally:
            lab.kill_daemon("backup", signal.SIGCONT)
        counters = {}
        for _ in range(40):  # the daemon reads the kernel's statistics once a second
            time.sleep(0.1)
            counters = lab.control("backup")["counters"]
            if counters.get("kernel_queue_full_drops"):
                break
        assert counters.get("kernel_queue_full_drops", 0) >= CONNS - 64 - 10, counters
        client.stdin.write("go\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=60)
        assert out.split()[-2:] == ["BAD", "0"], out  # the clients' resent SYNs made up for it
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    with open(os.path.join(lab.STATE_DIR, "logs", "backup-daemon.log")) as f:
        events = [json.loads(line) for line in f if line.startswith("{")]
    drops = [e for e in events if e["event"] == "kernel_queue_drops"]
    assert drops and drops[0]["queue"] == 12 and drops[0]["queue_full"] >= CONNS - 64 - 10, drops
