"""nfq-sttcp replay: stream extraction from pcaps (pure), clear errors for
captures it cannot replay, and the replay itself over loopback sockets."""

import hashlib
import os
import random
import socket
import subprocess
import sys
import threading

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from nfq_sttcp import replay
from nfq_sttcp.pcap import PcapError
from nfq_sttcp.testapp import stream_bytes

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "captures", "lab-mixed.pcap")
C, S = "10.1.0.10", "10.1.0.1"


def test_the_lab_sample_yields_every_stream_whole():
    ex = replay.extract(SAMPLE)
    assert ex.notes == []
    by_port = {}
    for s in ex.streams:
        by_port.setdefault(s.server[1], []).append(s)
        assert s.client_fin and s.server_fin and not s.reset
    echo = by_port[7000]
    assert len(echo) == 2 and all(bytes(s.server_data) == b"".join(c.data for c in s.chunks) for s in echo)
    (down,) = by_port[7001]
    length, seed = (int(x) for x in down.chunks[0].data.split())
    assert bytes(down.server_data) == stream_bytes(seed, 0, length)
    (sink,) = by_port[7002]
    upload = b"".join(c.data for c in sink.chunks)
    assert hashlib.sha256(upload).hexdigest() in sink.server_data.decode()
    (banner,) = by_port[7003]
    assert banner.chunks[0].server_before > 0  # the server spoke first: the client's first bytes wait for it


def _conn(payload_up, payload_down, isn_c=4000000000, isn_s=77, sport=40000, dport=9000, shuffle=False, dup=False):
    pk = [Ether() / IP(src=C, dst=S) / TCP(sport=sport, dport=dport, flags="S", seq=isn_c),
          Ether() / IP(src=S, dst=C) / TCP(sport=dport, dport=sport, flags="SA", seq=isn_s, ack=isn_c + 1),
          Ether() / IP(src=C, dst=S) / TCP(sport=sport, dport=dport, flags="A", seq=isn_c + 1, ack=isn_s + 1)]
    data = []
    for i in range(0, len(payload_up), 100):
        data.append(Ether() / IP(src=C, dst=S) / TCP(sport=sport, dport=dport, flags="PA",
                                                      seq=(isn_c + 1 + i) & 0xFFFFFFFF) / payload_up[i:i + 100])
    if shuffle:
        random.Random(3).shuffle(data)
    if dup:
        data += data[:3]
    pk += data
    pk.append(Ether() / IP(src=S, dst=C) / TCP(sport=dport, dport=sport, flags="PA", seq=isn_s + 1) / payload_down)
    end = (isn_c + 1 + len(payload_up)) & 0xFFFFFFFF
    pk.append(Ether() / IP(src=C, dst=S) / TCP(sport=sport, dport=dport, flags="FA", seq=end))
    pk.append(Ether() / IP(src=S, dst=C) / TCP(sport=dport, dport=sport, flags="FA", seq=isn_s + 1 + len(payload_down)))
    for i, p in enumerate(pk):
        p.time = 1000 + i * 0.001
    return pk


def test_out_of_order_and_retransmitted_segments_are_resolved_across_wraparound(tmp_path):
    up = bytes(random.Random(1).getrandbits(8) for _ in range(3000))
    path = str(tmp_path / "ooo.pcap")
    wrpcap(path, _conn(up, b"thanks", isn_c=2**32 - 1500, shuffle=True, dup=True))
    (s,) = replay.extract(path).streams
    assert b"".join(c.data for c in s.chunks) == up
    assert bytes(s.server_data) == b"thanks" and s.client_fin and s.server_fin


def _bad(tmp_path, name, packets):
    path = str(tmp_path / name)
    wrpcap(path, packets)
    return path


@pytest.mark.parametrize("case,message", [
    ("udp", "no IPv4 TCP in the capture"),
    ("ipv6", "IPv6 is not supported"),
    ("midstream", "starts mid-stream"),
    ("snaplen", "record with 'tcpdump -s 0'"),
    ("cutoff", "cut off inside a record"),
    ("cutoff_header", "cut off inside a record header"),
    ("pcapng", "pcapng is not supported"),
    ("missing", "No such file"),
])
def test_captures_it_cannot_replay_get_a_clear_error(tmp_path, case, message):
    if case == "udp":
        path = _bad(tmp_path, "u.pcap", [Ether() / IP(src=C, dst=S) / UDP(sport=1, dport=53) / b"x"])
    elif case == "ipv6":
        path = _bad(tmp_path, "6.pcap", [Ether() / IPv6(src="fd00::1", dst="fd00::2") / TCP(flags="S")])
    elif case == "midstream":
        path = _bad(tmp_path, "m.pcap", _conn(b"a" * 300, b"b")[3:])
    elif case == "snaplen":
        path = str(tmp_path / "s.pcap")  # as tcpdump -s 80 writes it: records cut, original lengths kept
        with open(SAMPLE, "rb") as f, open(path, "wb") as out:
            head = bytearray(f.read(24))
            head[16:20] = (80).to_bytes(4, "little")
            out.write(head)
            while len(rec := f.read(16)) == 16:
                incl = int.from_bytes(rec[8:12], "little")
                data = f.read(incl)[:80]
                out.write(rec[:8] + len(data).to_bytes(4, "little") + rec[12:16] + data)
    elif case == "cutoff":
        path = str(tmp_path / "c.pcap")
        with open(SAMPLE, "rb") as f:
            data = f.read(5000)
        with open(path, "wb") as f:
            f.write(data)
    elif case == "cutoff_header":
        path = str(tmp_path / "h.pcap")  # whole records, then half of the next one's header
        with open(SAMPLE, "rb") as f:
            data = f.read(24)
            for _ in range(3):
                rec = f.read(16)
                data += rec + f.read(int.from_bytes(rec[8:12], "little"))
            data += f.read(8)
        with open(path, "wb") as f:
            f.write(data)
    elif case == "pcapng":
        path = str(tmp_path / "n.pcapng")
        with open(path, "wb") as f:
            f.write(b"\x0a\x0d\x0d\x0a" + b"\0" * 40)
    else:
        path = str(tmp_path / "none.pcap")
    with pytest.raises(PcapError, match=message):
        replay.extract(path)
    r = subprocess.run([sys.executable, "-m", "nfq_sttcp", "replay", path, "--target", "127.0.0.1:9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("nfq-sttcp: cannot replay: ") and message in r.stderr


def test_first_mismatch_and_crash_points():
    assert replay.first_mismatch(b"abcdef", b"abcdef") is None
    assert replay.first_mismatch(b"abcXef", b"abcdef") == 3
    assert replay.first_mismatch(b"abc", b"abcdef") == 3
    assert replay.first_mismatch(b"abcdefg", b"abcdef") == 6
    assert replay.first_mismatch(b"x" * 100000 + b"y", b"x" * 100001) == 100000
    assert replay.parse_crash_point("2.5") == ("time", 2.5) == replay.parse_crash_point("2.5s")
    assert replay.parse_crash_point("10MB") == ("bytes", 10 * 2**20)
    assert replay.parse_crash_point("64kb") == ("bytes", 65536)
    with pytest.raises(ValueError, match="neither seconds"):
        replay.parse_crash_point("soon")
    for bad in ("-5MB", "-1", "nan", "nanKB", "inf"):
        with pytest.raises(ValueError, match="finite number, not negative"):
            replay.parse_crash_point(bad)


class _Server:
    """Loopback server that answers like the capture's server, with the
    byte at ``corrupt`` changed."""

    def __init__(self, answer, corrupt=None):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.answer, self.corrupt = bytearray(answer), corrupt
        if corrupt is not None:
            self.answer[corrupt] ^= 1
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        c, _ = self.srv.accept()
        with c:
            got = b""
            while True:
                d = c.recv(65536)
                if not d:
                    break
                got += d
            c.sendall(bytes(self.answer))


@pytest.mark.parametrize("corrupt", [None, 4321])
def test_replay_reports_the_first_mismatching_offset(tmp_path, corrupt):
    up = os.urandom(20000)
    answer = hashlib.sha256(up).digest() * 300
    path = str(tmp_path / "r.pcap")
    wrpcap(path, _conn(up, answer))
    ex = replay.extract(path)
    srv = _Server(answer, corrupt)
    report = replay.replay(ex.streams, "127.0.0.1", srv.port, speed=5.0, timeout=20)
    (c,) = report["connections"]
    assert c["sent"] == len(up) and c["received"] == c["expected"] == len(answer)
    assert c["first_mismatch"] == corrupt and report["ok"] == (corrupt is None)


def test_a_fin_seen_before_a_hole_is_filled_still_ends_the_stream(tmp_path):
    up = bytes(range(250))
    pk = _conn(up, b"ok")
    fin = pk[-2]  # the client's FIN
    pk = pk[:4] + [fin] + pk[4:-2] + pk[-1:]  # the FIN arrives before the rest of the data
    for i, p in enumerate(pk):
        p.time = 1000 + i * 0.001
    path = str(tmp_path / "finooo.pcap")
    wrpcap(path, pk)
    (s,) = replay.extract(path).streams
    assert b"".join(c.data for c in s.chunks) == up and s.client_fin
