"""The kernel behaviour a backup-side fast path would take over with.

If the backup's daemon stopped copying its stack's segments and let its own
socket's send queue be the hold buffer (fastpath.py, "the backup's side"),
its stack would believe the dropped segments were in flight. At takeover
nothing moves it: the client has nothing new to ack, plain duplicate acks do
not count on a SACK connection (RACK), and the stack's retransmission timeout
is 200 ms or more away, backed off further by every probe it sent during the
hold. One forged client ACK at the stack's snd_una, whose single SACK block
covers the last segment the stack sent, makes RACK declare every earlier
segment lost at once (each was sent long before the SACKed one): the stack
resends from snd_una within a millisecond. The price is the SACKed segment
itself, which the client never had: the stack resends it only when the
client's ack reaches it and shows the SACK reneged (a timer of at least
10 ms, tcp_check_sack_reneging).

This checks that on this kernel, with real sockets: the route's rto_min is
raised to 5 s so that only the forged ACK can move the stack. That is also
the condition it needs: once the stack's own retransmission timer has fired
(in a real outage it does, 200 ms after the last ack), its undo heuristics
take later acks as proof that its resends were needless and cancel their
loss marks, and the forged ACK no longer helps (README, "Performance").
"""

import json
import os
import select
import subprocess
import sys

from nfq_sttcp import lab

NS_C, NS_S = lab.PREFIX + "kt-client", lab.PREFIX + "kt-server"
CLIENT, SERVER, PORT = "10.79.0.1", "10.79.0.2", 7100
APP = os.path.join(os.path.dirname(__file__), "apps", "held_stream.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLIENT_CODE = r"""
import json, socket, sys, time
pattern = bytes(i % 251 for i in range(251 * 261))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.settimeout(5)
got, bad, t0, gaps, last = 0, 0, time.monotonic(), [], time.monotonic()
while True:
    try:
        d = s.recv(1 << 20)
    except OSError:
        break
    if not d:
        break
    now = time.monotonic()
    if now - last > 0.005:
        gaps.append([round((last - t0) * 1000, 1), round((now - last) * 1000, 2), got])
    off = got % len(pattern)
    want = (pattern[off:] + pattern * (len(d) // len(pattern) + 2))[:len(d)]
    bad += d != want
    got, last = got + len(d), now
print(json.dumps({"got": got, "bad_reads": bad, "gaps": gaps}), flush=True)
"""


def _sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def _line(proc, timeout):
    """The next line of ``proc``'s output, or a failure after ``timeout`` seconds."""
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise AssertionError("no output from %s in %d s" % (proc.args[-4:], timeout))
    return proc.stdout.readline()


def test_a_forged_sack_makes_a_stack_whose_output_was_dropped_resend_at_once():
    server = client = None
    try:
        for ns in (NS_C, NS_S):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", "kt-c", "netns", NS_C, "type", "veth", "peer", "name", "kt-s", "netns", NS_S)
        _sh("ip", "-n", NS_C, "addr", "add", CLIENT + "/24", "dev", "kt-c")
        _sh("ip", "-n", NS_S, "addr", "add", SERVER + "/24", "dev", "kt-s")
        for ns, dev in ((NS_C, "kt-c"), (NS_S, "kt-s")):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        for conf in ("all", "default", "lo", "kt-s"):  # the forged ACK comes in through lo
            _sh("ip", "netns", "exec", NS_S, "sysctl", "-qw", "net.ipv4.conf.%s.rp_filter=0" % conf)
        _sh("ip", "-n", NS_S, "route", "replace", CLIENT + "/32", "dev", "kt-s", "rto_min", "5s")
        ipt = ["ip", "netns", "exec", NS_S, "iptables", "-t", "mangle", "-A"]
        _sh(*ipt, "POSTROUTING", "-o", "kt-s", "-p", "tcp", "--sport", str(PORT), "-j", "NFQUEUE", "--queue-num", "1")
        _sh(*ipt, "PREROUTING", "-p", "tcp", "--dport", str(PORT), "-j", "NFQUEUE", "--queue-num", "2")
        env = dict(os.environ, PYTHONPATH=ROOT)
        server = subprocess.Popen(["ip", "netns", "exec", NS_S, sys.executable, APP, SERVER, CLIENT, str(PORT), "1"],
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert _line(server, 10).strip() == "LISTENING"
        client = subprocess.Popen(["ip", "netns", "exec", NS_C, sys.executable, "-c", CLIENT_CODE, SERVER, str(PORT)],
                                  stdout=subprocess.PIPE, text=True)
        seen = json.loads(_line(server, 30))
        assert "error" not in seen, seen
        got = json.loads(client.communicate(timeout=30)[0])
        server.wait(timeout=10)
    finally:
        for proc in (server, client):  # (their namespaces outlive the names while they run)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for ns in (NS_C, NS_S):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print(seen, got)
    assert seen["held"] > 0 and seen["last"] is not None
    # The control: a full second after the hold, with nothing but the timer
    # to move it, the stack resent nothing.
    assert seen["quiet_resends"] == 0, seen
    # The forged ACK: resends from the client's ack point on, then past the
    # SACKed segment (which came later, once its SACK showed reneged).
    assert seen["n_resends"] > 1, seen
    first_ms, first_seq, _ = seen["resends"][0]
    assert first_seq == seen["snd_una"], seen
    assert seen["sacked_resent_ms"] is not None and seen["sacked_resent_ms"] > first_ms, seen
    # The client's stream is whole: it stood still through the hold and the
    # quiet second (1.2 s), then got the held bytes and more.
    assert got["bad_reads"] == 0, got
    stall = [g for g in got["gaps"] if g[1] >= 1000]
    assert len(stall) == 1, got
    in_flight = (seen["last"][1] - seen["snd_una"]) & 0xFFFFFFFF
    assert got["got"] > stall[0][2] + in_flight, (got, seen)
