"""A hostile sync link and hostile packets (issue: nobody gets in, nothing breaks).

A rogue host is attached to the sync-link bridge and speaks with scapy; the
client's namespace sends malformed and odd segments at the live queue."""

import subprocess
import sys
import time

from nfq_sttcp import lab, scenario

ROGUE, ROGUE_IP = "sttcp-rogue", "10.78.0.66"
PY = sys.executable
CLI = [PY, "-m", "nfq_sttcp"]


def rogue_up():
    subprocess.run(["ip", "netns", "add", ROGUE], check=True)
    subprocess.run(["ip", "-n", ROGUE, "link", "set", "lo", "up"], check=True)
    lab.attach(lab.NS_SYNC, "br1", "rs0", ROGUE, "rogue0")
    subprocess.run(["ip", "-n", ROGUE, "addr", "add", ROGUE_IP + "/24", "dev", "rogue0"], check=True)


def in_ns(ns, code, *args, wait=True):
    p = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", code] + list(args),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return out


FORGER = r'''
import sys, time
from scapy.all import IP, UDP, Raw, send, conf
conf.verb = 0
from nfq_sttcp import syncproto
from nfq_sttcp.syncproto import Heartbeat, ConnIsn, Confirm, ConfirmEntry
kind, seconds = sys.argv[1], float(sys.argv[2])
key = b"not-the-real-key-0123456789"
ck = ("10.77.0.10", int(sys.argv[3]) if len(sys.argv) > 3 else 1, "10.77.0.100", 7000)
end = time.time() + seconds
n = 0
while time.time() < end:
    n += 1
    if kind == "heartbeat":    # pose as the primary, to keep it "alive"
        msg, src, dst = Heartbeat("primary", "serving", n), "10.78.0.1", "10.78.0.2"
    elif kind == "isn":        # a forged ISN for a live connection
        msg, src, dst = ConnIsn(ck, 12345, 999, True, 1460, 7, True), "10.78.0.1", "10.78.0.2"
    else:                      # a forged confirmation, to unclamp the primary
        msg, src, dst = Confirm((ConfirmEntry(ck, 4000000000, None, (), None),)), "10.78.0.2", "10.78.0.1"
    for k in (key, None):      # a wrong key, and no MAC at all
        send(IP(src=src, dst=dst) / UDP(sport=7788, dport=7788) / Raw(syncproto.encode(msg, 2**63, n, k)))
    time.sleep(0.01)
print(n)
'''

REPLAYER = r'''
import sys, time
from scapy.all import rdpcap, send, conf, IP, UDP
conf.verb = 0
pkts = [p[IP] for p in rdpcap(sys.argv[1]) if IP in p]
for p in pkts:
    # captured on a veth: the UDP checksum is only partial (offload); an
    # attacker replaying them would fix it, and so do we
    del p[UDP].chksum
end = time.time() + float(sys.argv[2])
n = 0
while time.time() < end:
    for p in pkts:
        send(p)
        n += 1
    time.sleep(0.01)
print(n)
'''


def test_spoofed_and_replayed_heartbeats_do_not_keep_a_crashed_primary_alive(make_lab, tmp_path):
    make_lab()
    rogue_up()
    # record genuine sync traffic from the primary, to replay it later
    cap = tmp_path / "sync.pcap"
    dump = scenario.Capture(str(cap), ns=lab.NS_BACKUP, iface=lab.SYNC_IF, bpf="udp and src host 10.78.0.1",
                            snaplen=2048)
    time.sleep(1.0)
    dump.finish()
    before = lab.status()["daemons"]["backup"]["counters"]
    forger = in_ns(ROGUE, FORGER, "heartbeat", "3", wait=False)
    replayer = in_ns(ROGUE, REPLAYER, str(cap), "3", wait=False)
    time.sleep(0.5)
    t0 = time.monotonic()
    lab.crash("primary")
    while lab.status()["daemons"]["backup"]["state"] != "active":
        assert time.monotonic() - t0 < 2.0, "forged or replayed beats kept a dead primary alive"
        time.sleep(0.01)
    st = lab.status()["daemons"]["backup"]
    assert st["failover"]["detection_ms"] < 250
    forger.communicate(timeout=30)
    replayed = int(replayer.communicate(timeout=30)[0])
    after = lab.status()["daemons"]["backup"]["counters"]
    assert after.get("sync_rejected", 0) - before.get("sync_rejected", 0) > 50
    seen_again = (after.get("sync_duplicate", 0) - before.get("sync_duplicate", 0)
                  + after.get("sync_replayed", 0) - before.get("sync_replayed", 0))
    assert replayed > 0 and seen_again >= replayed * 0.9, (replayed, before, after)


def test_forged_isn_and_confirmations_are_rejected_and_connections_survive(make_lab):
    make_lab()
    rogue_up()

    def attack():
        for role, kind in (("backup", "isn"), ("primary", "confirm")):
            before = lab.status()["daemons"][role]["counters"].get("sync_rejected", 0)
            in_ns(ROGUE, FORGER, kind, "1.0")
            after = lab.status()["daemons"][role]["counters"].get("sync_rejected", 0)
            assert after - before >= 10, (role, kind, before, after)

    r = scenario.run_with_crash(["echo:count=30,size=3000,pause_ms=10,crash_msg=10,after=5",
                                 "upload:bytes=%d,rate_kbps=40000,crash_at=%d" % (8 << 20, 4 << 20)],
                                before_crash=attack)
    for c in r["connections"]:
        assert c["ok"] and c["rsts_received"] == 0 and c["syns_sent"] == 1, (c["error"], c)


HOSTILE = r'''
import sys, time
from scapy.all import IP, TCP, Raw, send, fragment, conf, L3RawSocket
conf.verb = 0
conf.L3socket = L3RawSocket  # through the kernel's IP output path and its netfilter hooks
sport = int(sys.argv[1])
V, C = "10.77.0.100", "10.77.0.10"
base = lambda **kw: IP(src=C, dst=V) / TCP(sport=sport, dport=7000, **kw)
pkts = []
pkts.append(IP(src=C, dst=V, options=[b"\x01\x01\x01\x00"]) / TCP(sport=sport, dport=7000, flags="A", seq=5, ack=5))
raw = bytes(base(flags="A", options=[("Timestamp", (1, 2))]))
bad = bytearray(raw); bad[41] = 60                    # TS option claims 60 bytes: overruns the header
pkts.append(IP(bytes(bad)))
bad = bytearray(raw); bad[40] = 77; bad[41] = 1        # an option of length 1
pkts.append(IP(bytes(bad)))
pkts.append(base(flags="A", options=[(99, b"\x00" * 6)]))   # an unknown option
for flags in ("", "SF", "FPU", "SRA", "FSRPAUEC", "R", "A"):
    pkts.append(base(flags=flags, seq=1234, ack=5678))     # zero-length, odd flag combinations
pkts += fragment(base(flags="PA") / Raw(b"x" * 3000), fragsize=800)
bad = bytearray(raw); bad[32] = 0x30                  # TCP data offset 3
pkts.append(IP(bytes(bad)))
pkts.append(IP(src=C, dst=V, ihl=3) / TCP(sport=sport, dport=7000))   # bad IHL (the kernel drops it first)
pkts.append(IP(src=C, dst=V, len=1400) / TCP(sport=sport, dport=7000) / b"short")  # truncated: IP length > packet
for _ in range(int(sys.argv[2])):
    for p in pkts:
        send(p)
    time.sleep(0.02)
print(len(pkts))
'''


def test_hostile_segments_get_safe_verdicts_and_disturb_nothing(make_lab):
    make_lab()
    counts = {}

    def attack():
        port = lab.status()["daemons"]["backup"]["connections"][0]["conn"].split(":")[1].split(" ")[0]
        before = lab.status()["daemons"]["backup"]["counters"]
        # aimed at the live connection's own 4-tuple, and at a stranger
        in_ns(lab.NS_CLIENT, HOSTILE, port, "3")
        in_ns(lab.NS_CLIENT, HOSTILE, "45678", "1")
        # and bad output from the primary's own side, into its fail-open queue
        in_ns(lab.NS_PRIMARY, HOSTILE.replace('V, C = "10.77.0.100", "10.77.0.10"', 'C, V = "10.77.0.100", "10.77.0.10"')
              .replace("sport=sport, dport=7000", "sport=7000, dport=sport"), "45679", "1")
        after = lab.status()["daemons"]
        counts["backup"] = {k: after["backup"]["counters"].get(k, 0) - before.get(k, 0)
                            for k in ("malformed_in", "unknown_in", "syn_into_live_connection")}
        counts["primary"] = after["primary"]["counters"]
        assert after["backup"]["counters"].get("handler_errors", 0) == 0
        assert after["primary"]["counters"].get("handler_errors", 0) == 0

    r = scenario.run_with_crash(["echo:count=40,size=2000,pause_ms=20,crash_msg=10,after=10"], before_crash=attack)
    c = r["connections"][0]
    # (the capture's SYN count includes the forged SYNs sent from the client's namespace)
    assert c["ok"] and c["rsts_received"] == 0, (c["error"], c, counts)
    assert counts["backup"]["malformed_in"] > 0, counts
    assert counts["primary"].get("malformed_out", 0) > 0, counts


def test_other_traffic_is_never_diverted(make_lab):
    make_lab()
    # a UDP and a TCP service on ports nfq-sttcp does not protect
    srv = in_ns(lab.NS_PRIMARY, r'''
import socket, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 9999))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 8000)); t.listen()
print("ready", flush=True)
d, a = u.recvfrom(100); u.sendto(d, a)
c, _ = t.accept(); c.sendall(c.recv(100))
''', wait=False)
    assert srv.stdout.readline().strip() == "ready"

    def queued():
        out = subprocess.run(["ip", "netns", "exec", lab.NS_PRIMARY, "iptables", "-w", "-t", "mangle", "-L",
                              "STTCP-POUT", "-v", "-x", "-n"], capture_output=True, text=True).stdout
        return sum(int(l.split()[0]) for l in out.splitlines() if "NFQUEUE" in l)

    before = queued()
    out = in_ns(lab.NS_CLIENT, r'''
import socket, struct
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
u.sendto(b"udp-ok", ("10.77.0.100", 9999)); print(u.recvfrom(100)[0].decode())
t = socket.create_connection(("10.77.0.100", 8000), timeout=3); t.sendall(b"tcp-ok"); print(t.recv(100).decode())
ic = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); ic.settimeout(3)
pkt = bytearray(struct.pack("!BBHHH", 8, 0, 0, 7, 1) + b"ping")
s = sum(struct.unpack("!%dH" % (len(pkt) // 2), pkt)); s = (s & 0xffff) + (s >> 16); pkt[2:4] = struct.pack("!H", ~s & 0xffff)
ic.sendto(bytes(pkt), ("10.77.0.100", 0))
while True:
    d = ic.recv(200)
    if d[20] == 0:
        print("icmp-ok"); break
''')
    assert out.split() == ["udp-ok", "tcp-ok", "icmp-ok"]
    srv.communicate(timeout=10)
    assert queued() == before, "only the protected TCP ports may be queued"
