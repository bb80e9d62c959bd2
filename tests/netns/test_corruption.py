"""A client segment changed on a link. The primary's TEE clones it before its
stack checks the checksum, so the backup gets the changed copy too. The
backup must drop it, as the primary's stack does, and not sum a fresh
checksum over it: its application would read bytes the client never sent,
diverge, and the connection would be reset at the failover.

(It can be seen in the lab because a veth on this kernel does not mark a
raw socket's packet as checked: the primary's stack counts it in
TcpInCsumErrors, and the backup's queue is told NFQA_SKB_CSUM_NOTVERIFIED.)"""

import subprocess
import sys
import time

from nfq_sttcp import lab

from .checks import EchoProbe

# Runs in the client's namespace: learns the probe connection's next
# sequence number from one of its data segments, then sends a segment at
# exactly that point whose payload no longer matches its checksum.
CORRUPT = r"""
import sys, time
from scapy.all import AsyncSniffer, IP, TCP, Raw, send, conf
conf.verb = 0
port, vip = int(sys.argv[1]), sys.argv[2]
sniffer = AsyncSniffer(iface="eth0", count=1, filter="tcp and src port %d and dst host %s and tcp[13] & 8 != 0" % (port, vip))
sniffer.start()
time.sleep(0.5)  # (AsyncSniffer starts its socket in a thread)
print("ready", flush=True)
sys.stdin.readline()  # the probe sends "x\n" now
sniffer.join(5)
seg = sniffer.results[0]
ts = [o for o in seg[TCP].options if o[0] == "Timestamp"]
pkt = IP(src=seg[IP].src, dst=vip) / TCP(sport=port, dport=seg[TCP].dport, flags="PA",
         seq=seg[TCP].seq + len(seg[TCP].payload), ack=seg[TCP].ack + 2, window=seg[TCP].window,
         options=ts) / Raw(b"EVIL\n")
raw = bytearray(bytes(pkt))  # (scapy fills in the right checksum)
raw[-5:] = b"GOOD\n"         # the same length, changed "on the link"
send(IP(bytes(raw)))
print("sent", flush=True)
"""


def _corrupt_after_next_ping(probe):
    """Ping once while the helper learns the connection's next sequence
    number; it then sends a changed segment at exactly that point."""
    helper = subprocess.Popen(["ip", "netns", "exec", lab.NS_CLIENT, sys.executable, "-c", CORRUPT,
                               str(probe.port), lab.VIP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout.readline().strip() == "ready"
        helper.stdin.write("go\n")
        helper.stdin.flush()
        assert probe.ping("x") == "ok"
        assert helper.stdout.readline().strip() == "sent", "the corrupting helper failed"
    finally:
        helper.kill()
        helper.wait()


def _bad_checksums():
    return lab.control("backup")["counters"].get("bad_checksum_in", 0)


def _wait_for(pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.05)
    return pred()


def test_a_segment_changed_on_a_link_reaches_neither_stack(make_lab):
    make_lab()
    probe = EchoProbe(7000)
    try:
        _corrupt_after_next_ping(probe)
        assert _wait_for(lambda: _bad_checksums() >= 1), "the backup did not drop the changed clone"
        # The client's real next bytes; the primary's stack refused the
        # changed segment, so this is what both applications read next.
        assert probe.ping("real line") == "ok"
        time.sleep(0.3)  # (the backup's digests of the echo reach it)
        backup = [c for c in lab.control("backup")["connections"]
                  if c["conn"].startswith("%s:%d " % (lab.CLIENT_IP, probe.port))]
        assert backup and backup[0]["protected"], backup
        lab.crash("primary")
        time.sleep(0.5)
        # Summed afresh, the changed bytes would have been echoed by the
        # backup's application: diverged, and reset here.
        assert probe.ping("after the crash") == "ok"
        # Now the backup serves, and a changed segment reaches only its stack:
        # made valid, its bytes would be the next the application reads.
        before = _bad_checksums()
        _corrupt_after_next_ping(probe)
        assert _wait_for(lambda: _bad_checksums() > before), "the serving backup did not drop the changed segment"
        assert probe.ping("and once more") == "ok"
    finally:
        probe.close()
