"""Replay the client side of captured TCP connections, and check the answers.

``nfq-sttcp replay CAPTURE.pcap --target HOST[:PORT]`` takes every
client-to-server TCP stream in a pcap (the client is the side that sent the
SYN), from the handshake to the FIN, with retransmissions and out-of-order
segments resolved, and replays it over a real kernel socket: the sends in
their order, at their (scaled) times, and never before the server bytes
that preceded them in the capture have come back. What the server answers
is compared byte for byte with what it answered in the capture.

``extract`` is pure (a file in, streams out); ``replay`` does the I/O.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .pcap import PcapError, network_layer, read_frames
from .tcpseg import ACK, FIN, RST, SYN

MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class ClientChunk:
    t: float  # when these bytes became contiguous in the capture
    server_before: int  # server bytes contiguous in the capture by then
    data: bytes


@dataclass
class Stream:
    client: tuple[str, int]
    server: tuple[str, int]
    t_syn: float
    chunks: list[ClientChunk] = field(default_factory=list)
    server_data: bytearray = field(default_factory=bytearray)
    client_fin: bool = False
    server_fin: bool = False
    reset: bool = False

    @property
    def label(self) -> str:
        return "%s:%d -> %s:%d" % (self.client + self.server)

    @property
    def client_bytes(self) -> int:
        return sum(len(c.data) for c in self.chunks)


@dataclass
class Extracted:
    streams: list[Stream]
    notes: list[str]  # what was skipped, and why


class _Reassembler:
    """One direction of a connection: bytes in order, whatever the capture order."""

    def __init__(self, isn: int) -> None:
        self.base = (isn + 1) & MASK
        self.next = 0  # offset of the next byte we lack
        self.pending: dict[int, bytes] = {}

    def add(self, seq: int, payload: bytes) -> bytes:
        off = (seq - self.base) & MASK
        if off >= 1 << 31 or off + len(payload) <= self.next:
            return b""  # before the stream, or a retransmission of what we have
        if len(payload) > len(self.pending.get(off, b"")):
            self.pending[off] = payload
        out = bytearray()
        while True:
            hit = [(o, p) for o, p in self.pending.items() if o <= self.next < o + len(p)]
            for o in [o for o, p in self.pending.items() if o + len(p) <= self.next]:
                del self.pending[o]
            if not hit:
                return bytes(out)
            o, p = max(hit, key=lambda h: h[0] + len(h[1]))
            piece = p[self.next - o:]
            out += piece
            self.next += len(piece)


@dataclass
class _Packet:
    t: float
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    flags: int
    payload: bytes


def _packets(path: str, notes: list[str]) -> list[_Packet]:
    out: list[_Packet] = []
    ipv6 = other = cut = 0
    for t, linktype, data, orig in read_frames(path):
        proto, off = network_layer(data, linktype)
        if proto == 0x86DD:
            ipv6 += 1
            continue
        if proto != 0x0800 or len(data) < off + 20 or data[off + 9] != 6:
            other += 1
            continue
        if orig > len(data):
            cut = len(data)
            continue
        ihl = (data[off] & 0x0F) * 4
        total = struct.unpack_from("!H", data, off + 2)[0]
        frag = struct.unpack_from("!H", data, off + 6)[0]
        if frag & 0x3FFF:
            raise PcapError("%s: IP fragments are not supported (packet at %.6f)" % (path, t))
        t_off = off + ihl
        if len(data) < t_off + 20 or len(data) < off + total:
            raise PcapError("%s: a malformed TCP packet at %.6f" % (path, t))
        sport, dport, seq, _ack, doff_b, flags = struct.unpack_from("!HHIIBB", data, t_off)
        doff = (doff_b >> 4) * 4
        if doff < 20 or t_off + doff > off + total:
            raise PcapError("%s: a malformed TCP header at %.6f" % (path, t))
        src, dst = socket.inet_ntoa(data[off + 12:off + 16]), socket.inet_ntoa(data[off + 16:off + 20])
        out.append(_Packet(t, (src, sport), (dst, dport), seq, flags, bytes(data[t_off + doff:off + total])))
    if cut:
        raise PcapError("%s: packets were cut to %d bytes when captured: record with 'tcpdump -s 0'" % (path, cut))
    if not out:
        if ipv6:
            raise PcapError("%s: only IPv6 TCP in the capture; IPv6 is not supported" % path)
        raise PcapError("%s: no IPv4 TCP in the capture (%d other packets)" % (path, other))
    if ipv6:
        notes.append("%d IPv6 packets skipped: IPv6 is not supported" % ipv6)
    if other:
        notes.append("%d packets that are not IPv4 TCP skipped" % other)
    return out


def extract(path: str) -> Extracted:
    """Every client-to-server stream of a pcap file. Raises PcapError."""
    notes: list[str] = []
    pkts = _packets(path, notes)
    pkts.sort(key=lambda p: p.t)
    conns: dict[frozenset, list[_Packet]] = {}
    for p in pkts:
        conns.setdefault(frozenset((p.src, p.dst)), []).append(p)
    streams: list[Stream] = []
    for ps in conns.values():
        s = _one_stream(ps, notes)
        if s is not None:
            streams.append(s)
    if not streams:
        raise PcapError("%s: no connection in the capture can be replayed (%s)" % (path, "; ".join(notes)))
    streams.sort(key=lambda s: s.t_syn)
    return Extracted(streams, notes)


def _one_stream(ps: list[_Packet], notes: list[str]) -> Optional[Stream]:
    syn = next((p for p in ps if p.flags & SYN and not p.flags & ACK), None)
    if syn is None:
        notes.append("%s:%d <-> %s:%d starts mid-stream (no SYN in the capture): skipped" % (ps[0].src + ps[0].dst))
        return None
    client, server = syn.src, syn.dst
    synack = next((p for p in ps if p.src == server and p.flags & SYN and p.flags & ACK), None)
    if synack is None:
        notes.append("%s:%d -> %s:%d: the server's SYN-ACK is not in the capture: skipped" % (client + server))
        return None
    s = Stream(client, server, syn.t)
    up, down = _Reassembler(syn.seq), _Reassembler(synack.seq)
    fin_up: Optional[int] = None  # stream offset of each side's FIN, once seen (it may come before a hole is filled)
    fin_down: Optional[int] = None
    for p in ps:
        if p.t < syn.t:
            continue
        if p.flags & RST:
            s.reset = True
            notes.append("%s: reset in the capture; replayed up to the reset" % s.label)
            break
        if p.src == client and not p.flags & SYN:
            new = up.add(p.seq, p.payload)
            if new:
                s.chunks.append(ClientChunk(p.t, len(s.server_data), new))
            if p.flags & FIN:
                fin_up = (p.seq + len(p.payload) - up.base) & MASK
            s.client_fin = fin_up is not None and up.next >= fin_up
        elif p.src == server and not p.flags & SYN:
            s.server_data += down.add(p.seq, p.payload)
            if p.flags & FIN:
                fin_down = (p.seq + len(p.payload) - down.base) & MASK
            s.server_fin = fin_down is not None and down.next >= fin_down
    if not s.client_fin and not s.reset:
        notes.append("%s: the capture ends before the client's FIN" % s.label)
    return s


# == replay (I/O) ==============================================================


@dataclass
class Result:
    label: str
    sent: int = 0
    received: int = 0
    expected: int = 0
    first_mismatch: Optional[int] = None
    error: Optional[str] = None
    gap_ms: Optional[float] = None
    receipts: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_mismatch is None

    def as_dict(self) -> dict[str, Any]:
        return {"connection": self.label, "ok": self.ok, "sent": self.sent, "received": self.received,
                "expected": self.expected, "first_mismatch": self.first_mismatch, "error": self.error,
                "failover_gap_ms": self.gap_ms}


def first_mismatch(got: bytes | bytearray, want: bytes | bytearray) -> Optional[int]:
    """Offset of the first byte that differs (or where one ends early); None if equal."""
    n = min(len(got), len(want))
    if got[:n] != want[:n]:
        lo, hi = 0, n  # binary search for the first differing byte
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if got[lo:mid] != want[lo:mid]:
                hi = mid
            else:
                lo = mid
        return lo
    return None if len(got) == len(want) else n


def parse_crash_point(text: str) -> tuple[str, float]:
    """'2.5' or '2.5s' -> ('time', 2.5); '10MB', '64KB', '1000B' -> ('bytes', n)."""
    t = text.strip().lower()
    kind, v = "time", None
    for suffix, mult in (("mb", 1 << 20), ("kb", 1 << 10), ("b", 1)):
        if t.endswith(suffix):
            try:
                kind, v = "bytes", float(t[:-len(suffix)]) * mult
            except ValueError:
                pass
            break
    if v is None:
        try:
            v = float(t[:-1] if t.endswith("s") else t)
        except ValueError:
            raise ValueError("--crash-primary-at: %r is neither seconds (2.5, 2.5s) nor bytes (10MB, 64KB, 1000B)"
                             % text) from None
    if not 0 <= v < float("inf"):  # (also refuses nan)
        raise ValueError("--crash-primary-at must be a finite number, not negative: %r" % text)
    return kind, v


class _Progress:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n


def _run_one(s: Stream, addr: tuple[str, int], t0: float, start: float, speed: float, deadline: float,
             progress: _Progress, res: Result) -> None:
    res.expected = len(s.server_data)
    got = bytearray()
    try:
        delay = start + (s.t_syn - t0) / speed - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock = socket.create_connection(addr, timeout=10)
    except OSError as e:
        res.error = "connect: %s" % (e.strerror or e)
        return
    sock.setblocking(False)
    idx, out, shut, eof = 0, memoryview(b""), False, False
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            due = None
            if not out and idx < len(s.chunks):
                c = s.chunks[idx]
                due = start + (c.t - t0) / speed
                if now >= due and len(got) >= min(c.server_before, len(s.server_data)):
                    out, idx, due = memoryview(c.data), idx + 1, None
            if not out and idx == len(s.chunks) and s.client_fin and not shut:
                sock.shutdown(socket.SHUT_WR)
                shut = True
            if eof or (idx == len(s.chunks) and not out and not s.server_fin and len(got) >= len(s.server_data)):
                break
            wait = 0.05 if due is None else max(0.0, min(0.05, due - now))
            r, w, _ = select.select([sock], [sock] if out else [], [], wait)
            if w:
                n = sock.send(out)
                out = out[n:]
                res.sent += n
                progress.add(n)
            if r:
                data = sock.recv(1 << 16)
                if not data:
                    eof = True
                else:
                    got += data
                    res.receipts.append(time.monotonic())
                    progress.add(len(data))
        else:
            res.error = "timed out (%d of %d client bytes sent, %d of %d server bytes back)" % (
                res.sent, s.client_bytes, len(got), len(s.server_data))
        if eof and (idx < len(s.chunks) or out):
            res.error = "the server closed before the client had sent everything"
    except OSError as e:
        res.error = "%s after %d bytes sent, %d received" % (type(e).__name__, res.sent, len(got))
    finally:
        sock.close()
    res.received = len(got)
    res.first_mismatch = first_mismatch(got, s.server_data)


def replay(streams: list[Stream], host: str, port: Optional[int], speed: float = 1.0,
           crash_at: Optional[tuple[str, float]] = None, crash: Optional[Callable[[], float]] = None,
           timeout: float = 120.0, progress_cb: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Replay ``streams`` to ``host`` (each on ``port``, or on its own port).
    ``crash`` is called once at ``crash_at`` and returns its time.monotonic()."""
    if speed <= 0:
        raise ValueError("--speed must be positive")
    t0 = streams[0].t_syn
    start = time.monotonic() + 0.05
    last = max((s.chunks[-1].t for s in streams if s.chunks), default=t0)
    deadline = start + (last - t0) / speed + timeout
    progress = _Progress()
    results = [Result(s.label) for s in streams]
    threads = [threading.Thread(target=_run_one, daemon=True,
                                args=(s, (host, port or s.server[1]), t0, start, speed, deadline, progress, r))
               for s, r in zip(streams, results)]
    for th in threads:
        th.start()
    crash_t: Optional[float] = None
    last_note = time.monotonic()
    while any(th.is_alive() for th in threads):
        now = time.monotonic()
        if crash_at is not None and crash is not None and crash_t is None:
            kind, v = crash_at
            if (kind == "time" and now - start >= v) or (kind == "bytes" and progress.bytes >= v):
                crash_t = crash()
                if progress_cb:
                    progress_cb("primary crashed at %.2f s, %d bytes moved" % (crash_t - start, progress.bytes))
        if progress_cb and now - last_note >= 1.0:
            last_note = now
            done = sum(1 for th in threads if not th.is_alive())
            progress_cb("%d/%d connections done, %d bytes moved" % (done, len(threads), progress.bytes))
        time.sleep(0.005)
    for r in results:
        if crash_t is not None:
            before = [t for t in r.receipts if t <= crash_t]
            after = [t for t in r.receipts if t > crash_t]
            if before and after:
                r.gap_ms = round((after[0] - before[-1]) * 1000, 1)
    return {"ok": all(r.ok for r in results), "crashed": crash_t is not None,
            "crash_requested": crash_at is not None and crash is not None,
            "seconds": round(time.monotonic() - start, 3), "bytes_moved": progress.bytes,
            "connections": [r.as_dict() for r in results]}


def enter_netns(name: str) -> None:
    """Move this process (before it starts threads) into a named network namespace."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/run/netns/%s" % name, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            err = ctypes.get_errno()
            raise OSError(err, "setns into %s: %s" % (name, os.strerror(err)))
    finally:
        os.close(fd)
