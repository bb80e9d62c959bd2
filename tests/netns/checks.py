"""Checks shared by the end-to-end tests."""

import ast
import subprocess
import sys

from nfq_sttcp import lab


def _tcp_drops(host):
    """A host stack's drop counters, to say where lost clones went."""
    r = subprocess.run(["ip", "netns", "exec", lab.HOSTS[host], "nstat", "-az"], capture_output=True, text=True)
    keep = ("Drop", "Prune", "OFO", "InErrs", "InCsumErrors", "Collapsed")
    return {l.split()[0]: int(l.split()[1]) for l in r.stdout.splitlines()[1:]
            if len(l.split()) >= 2 and any(k in l.split()[0] for k in keep) and l.split()[1] != "0"}


# Every workload at once, crashed mid-stream: 12 MB each way at 40 Mbit/s,
# echo, request-response and a server-speaks-first banner.
MIXED = ["download:bytes=%d,rate_kbps=40000,crash_at=%d" % (12 << 20, 3 << 20),
         "upload:bytes=%d,rate_kbps=40000,crash_at=%d" % (12 << 20, 3 << 20),
         "echo:count=30,size=3000,pause_ms=20,crash_msg=8,after=10",
         "rr:count=30,size=20000,pause_ms=20,crash_msg=10,after=5",
         "banner:lines=30,pause_ms=20,crash_line=8,after=10"]
MIXED_BYTES = {"download": 12 << 20, "upload": 12 << 20}


def intact(report, expect_bytes=None, status=None):
    """Every connection of ``report`` is byte-exact, saw no RST and never
    reconnected. ``status`` (a daemon's) is quoted when one is not."""
    assert report["connections"], report.get("error")
    status = status or {}
    for c in report["connections"]:
        label = "%s:%s" % (c["kind"], c["local_port"])
        assert c["ok"], "%s failed: %s (first mismatch at %s); daemon queues %s, counters %s" % (
            label, c["error"], c["first_mismatch"], status.get("queues"), status.get("counters"))
        assert c["rsts_received"] == 0, "%s: client saw %d RSTs" % (label, c["rsts_received"])
        assert c["syns_sent"] == 1, "%s: client sent %d SYNs (reconnected?)" % (label, c["syns_sent"])
        assert c["wire_gap_ms"] is not None, "%s: no gap measured" % label
        if expect_bytes is not None and c["kind"] in expect_bytes:
            assert c["verified"] == expect_bytes[c["kind"]], label


def survived(report, expect_bytes=None, serving="backup"):
    """Every connection of ``report`` crossed the crash whole, and ``serving``
    (the host that took over) owns the VIP. Returns its daemon's status."""
    assert report["connections"], report.get("error")
    st = lab.status()
    backup = st["daemons"][serving]
    assert backup["state"] == "active", backup
    assert st["vip_owner"] == [serving]
    try:
        intact(report, expect_bytes, backup)
    except AssertionError as e:
        raise AssertionError("%s; %s TCP drops: %s" % (e, serving, _tcp_drops(serving))) from None
    drops = {q: v["queue_dropped"] for q, v in backup["queues"].items()}
    assert not any(drops.values()), "the backup's queues overflowed: %s" % drops
    print("failover: detection %s ms, takeover %s ms; gaps %s" % (
        backup["failover"]["detection_ms"], backup["failover"]["takeover_ms"],
        {"%s:%s" % (c["kind"], c["local_port"]): c["wire_gap_ms"] for c in report["connections"]}))
    return backup


def start_backup_with(pattern, replacement, what):
    """Change one line of the lab config (``pattern``, a regex of a whole
    line) before the backup's daemon reads it, then start that daemon: a
    backup configured unlike its primary, which has read the original."""
    import re

    with open(lab.config_path()) as f:
        toml = f.read()
    changed, n = re.subn(pattern, replacement, toml, flags=re.M)
    assert n == 1, "the lab config has no %s line" % what
    with open(lab.config_path(), "w") as f:
        f.write(changed)
    lab.start_backup_daemon(progress=lambda *_: None)


PROBE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1], flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError("closed by the server")
            got += chunk
        print(repr(got.decode(errors="replace")), flush=True)
    except Exception as e:
        print(repr("ERR " + type(e).__name__), flush=True)
"""


class EchoProbe:
    """One long-lived connection from the client, driven line by line: each
    line sent gets one line back (the echo service, or any line server)."""

    def __init__(self, port=7000):
        self.p = subprocess.Popen(["ip", "netns", "exec", lab.NS_CLIENT, sys.executable, "-c", PROBE, lab.VIP,
                                   str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self.p.stdout.readline())

    def ping(self, text):
        """"ok" when the echo came back whole; for other servers, see request()."""
        reply = self.request(text)
        return "ok" if reply == text + "\n" else "bad %r" % reply

    def request(self, text):
        """The line the server answered (with its newline), or "ERR <what>"."""
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()
        return ast.literal_eval(self.p.stdout.readline())

    def close(self):
        self.p.stdin.close()
        self.p.wait(10)


SET_BIG_TCP = """
import socket, struct, sys
ifname, size = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
attrs = b"".join(struct.pack("=HHI", 8, t, size) for t in (63, 64))  # IFLA_GSO/GRO_IPV4_MAX_SIZE
body = struct.pack("=BxHiII", 0, 0, socket.if_nametoindex(ifname), 0, 0) + attrs
s.sendto(struct.pack("=IHHII", 16 + len(body), 16, 0x5, 1, 0) + body, (0, 0))  # RTM_NEWLINK, request|ack
err = -struct.unpack_from("=i", s.recv(4096), 16)[0]
sys.exit(err)
"""


def big_tcp(ns, ifname, size):
    """Set gso_ipv4_max_size and gro_ipv4_max_size (iproute2 before 6.3 cannot)."""
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SET_BIG_TCP, ifname, str(size)], check=True)
