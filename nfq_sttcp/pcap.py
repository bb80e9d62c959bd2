"""A small pure reader of pcap files and the checks made on client captures.

Scapy would parse a 50 MB transfer's capture at ~2,500 packets/s; this reads
only what the checks need (headers) with struct, and accepts snap-truncated
packets because the checks never need the payload bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .tcpseg import ACK, FIN, RST, SYN

LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL = 1, 101, 113


class PcapError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TcpRecord:
    t: float
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    flags: int
    payload_len: int


def _ip(b: bytes) -> str:
    return "%d.%d.%d.%d" % (b[0], b[1], b[2], b[3])


def read_tcp(path: str) -> Iterator[TcpRecord]:
    """Yield the IPv4/TCP records of a pcap file; other records are skipped."""
    for t, linktype, data, _orig in read_frames(path, strict=False):
        r = _parse_frame(data, linktype, t)
        if r is not None:
            yield r


def read_frames(path: str, strict: bool = True) -> Iterator[tuple[float, int, bytes, int]]:
    """(time, link type, captured bytes, original length) of each record.
    ``strict``: a file cut off inside a record is an error, not its end."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PcapError("%s: %s" % (path, e.strerror)) from None
    with f:
        gh = f.read(24)
        if len(gh) < 24:
            raise PcapError("%s: not a pcap file (too short)" % path)
        magic = gh[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            endian = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            endian = ">"
        else:
            raise PcapError("%s: not a pcap file (pcapng is not supported; use tcpdump -w)" % path)
        nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
        linktype = struct.unpack(endian + "I", gh[20:24])[0]
        rec = struct.Struct(endian + "IIII")
        while True:
            rh = f.read(16)
            if 0 < len(rh) < 16 and strict:
                raise PcapError("%s: the file is cut off inside a record header" % path)
            if len(rh) < 16:
                return
            sec, frac, incl, orig = rec.unpack(rh)
            data = f.read(incl)
            if len(data) < incl:
                if strict:
                    raise PcapError("%s: the file is cut off inside a record (%d of %d bytes)"
                                    % (path, len(data), incl))
                return  # truncated final record
            yield sec + frac / (1e9 if nano else 1e6), linktype, data, orig


def network_layer(data: bytes, linktype: int) -> tuple[int, int]:
    """(ethertype-like protocol, offset of the network header) of a frame;
    protocol 0x0800 is IPv4, 0x86DD IPv6."""
    if linktype == LINKTYPE_ETHERNET:
        return (int.from_bytes(data[12:14], "big") if len(data) >= 14 else 0), 14
    if linktype == LINKTYPE_LINUX_SLL:
        return (int.from_bytes(data[14:16], "big") if len(data) >= 16 else 0), 16
    if linktype == LINKTYPE_RAW:
        return ({4: 0x0800, 6: 0x86DD}.get(data[0] >> 4, 0) if data else 0), 0
    raise PcapError("unsupported link type %d (Ethernet, Linux cooked and raw IP are)" % linktype)


def _parse_frame(data: bytes, linktype: int, t: float) -> Optional[TcpRecord]:
    proto, off = network_layer(data, linktype)
    if proto != 0x0800:
        return None
    if len(data) < off + 20 or data[off] >> 4 != 4 or data[off + 9] != 6:
        return None
    ihl = (data[off] & 0x0F) * 4
    total = struct.unpack_from("!H", data, off + 2)[0]
    t_off = off + ihl
    if len(data) < t_off + 14:
        return None
    sport, dport, seq, ack, doff_b, flags = struct.unpack_from("!HHIIBB", data, t_off)
    doff = (doff_b >> 4) * 4
    return TcpRecord(t, _ip(data[off + 12:off + 16]), sport, _ip(data[off + 16:off + 20]), dport, seq, ack,
                     flags, max(0, total - ihl - doff))


@dataclass
class ClientView:
    """What one client connection saw on the wire."""

    client_port: int
    server_port: int = 0
    syns_sent: int = 0  # connection attempts (distinct ISNs)
    syn_isns: set = field(default_factory=set)
    first_syn_t: Optional[float] = None  # capture time of the first SYN
    rsts_received: int = 0
    rsts_sent: int = 0
    server_segments: int = 0
    gap_ms: Optional[float] = None  # waiting for data (payload, SYN or FIN)
    ack_gap_ms: Optional[float] = None  # waiting for a new ack
    any_gap_ms: Optional[float] = None  # waiting for data or a new ack (what an uploading client waits for)
    resume_ms: Optional[float] = None  # from the crash to the first data after it
    any_resume_ms: Optional[float] = None  # from the crash to the first data or new ack after it


def client_view(records: list[TcpRecord], client_ip: str, server_ip: str,
                crash_wall: Optional[float]) -> dict[tuple[int, int], ClientView]:
    """Per (client port, server port): SYNs sent, RSTs seen, and the failover gap on the wire.

    The gap is the longest interval between two server segments that carry
    data (``gap_ms``), a new ack (``ack_gap_ms``) or either (``any_gap_ms``) among those ending after
    the crash: from the last byte before the crash to the first byte after
    it, and any later stall. Client think time falls inside it too, so the
    test clients keep their pauses short.
    """
    # Keyed by both ports: the kernel hands one ephemeral port to two
    # connections when their server ports differ (the 4-tuples stay unique),
    # and keyed by the client port alone their SYNs read as one reconnect.
    views: dict[tuple[int, int], ClientView] = {}
    last: dict[tuple[tuple[int, int], str], float] = {}
    server_ack: dict[tuple[int, int], int] = {}
    for r in records:
        if r.src == client_ip and r.dst == server_ip:
            v = views.setdefault((r.sport, r.dport), ClientView(r.sport, r.dport))
            if r.flags & SYN and not r.flags & ACK and r.seq not in v.syn_isns:
                # A retransmitted SYN is not a reconnect: count initial sequence numbers.
                v.syn_isns.add(r.seq)
                v.syns_sent += 1
                if v.first_syn_t is None:
                    v.first_syn_t = r.t
            if r.flags & RST:
                v.rsts_sent += 1
        elif r.src == server_ip and r.dst == client_ip:
            port = (r.dport, r.sport)
            v = views.setdefault(port, ClientView(r.dport, r.sport))
            v.server_segments += 1
            if r.flags & RST:
                v.rsts_received += 1
            new_ack = False
            if r.flags & ACK:
                prev_ack = server_ack.get(port)
                if prev_ack is None or 0 < ((r.ack - prev_ack) & 0xFFFFFFFF) < 1 << 31:
                    new_ack = prev_ack is not None
                    server_ack[port] = r.ack
            kinds = []
            if r.payload_len > 0 or r.flags & (SYN | FIN):
                kinds.append("data")
            if new_ack or r.flags & SYN:
                kinds.append("ack")
            if kinds:
                kinds.append("any")
            for kind in kinds:
                k = (port, kind)
                prev = last.get(k)
                if crash_wall is not None and r.t > crash_wall and kind != "ack" \
                        and (prev is None or prev <= crash_wall):
                    setattr(v, "resume_ms" if kind == "data" else "any_resume_ms",
                            round((r.t - crash_wall) * 1000, 1))
                if crash_wall is not None and prev is not None and r.t > crash_wall:
                    gap = round((r.t - prev) * 1000, 1)
                    attr = {"data": "gap_ms", "ack": "ack_gap_ms", "any": "any_gap_ms"}[kind]
                    if getattr(v, attr) is None or gap > getattr(v, attr):
                        setattr(v, attr, gap)
                last[k] = r.t
    return views
