"""Parsing and in-place rewriting of IPv4/TCP segments.

Pure code over bytes: no sockets, no logging. The ``set_*`` rewrites leave
the TCP checksum stale on purpose: after ``set_payload()`` the kernel marks
the packet CHECKSUM_NONE and recomputes nothing (DESIGN.md trap 2), and a
packet queued whole may carry only a partial checksum (nfqueue.py), so the
driver recomputes every rewritten or injected packet's checksum whole, once
(``with_correct_checksum``, in C). Scapy is the oracle for all of this in
the tests, never a dependency here (it is ~200x slower).
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .seqmath import MASK, seq_le

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_OK, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


class MalformedPacket(ValueError):
    """The bytes are not a complete IPv4/TCP segment that we may rewrite."""


ConnKey = tuple[str, int, str, int]
"""(client_ip, client_port, server_ip, server_port): the same on both servers."""


@dataclass(slots=True)
class Segment:
    """Offsets and field values of one parsed segment (offsets are absolute)."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    ihl: int
    tcp_off: int
    doff: int
    total_len: int
    payload_len: int
    ts_off: int = -1  # offset of TSval; TSecr follows at +4
    tsval: int = 0
    tsecr: int = 0
    sack_off: int = -1  # offset of the SACK option's kind byte
    sack_blocks: tuple[tuple[int, int], ...] = ()
    mss: Optional[int] = None
    wscale: Optional[int] = None
    sack_ok: bool = False

    @property
    def csum_off(self) -> int:
        return self.tcp_off + 16

    @property
    def has_ts(self) -> bool:
        return self.ts_off >= 0

    @property
    def seq_len(self) -> int:
        """Sequence space the segment consumes (payload plus SYN and FIN)."""
        return self.payload_len + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    @property
    def end_seq(self) -> int:
        return (self.seq + self.seq_len) & MASK

    def is_pure_ack(self) -> bool:
        return self.payload_len == 0 and not (self.flags & (SYN | FIN | RST)) and bool(self.flags & ACK)

    def server_key(self) -> ConnKey:
        """Key of a segment sent by the server (src is the service address)."""
        return (self.dst, self.dport, self.src, self.sport)

    def client_key(self) -> ConnKey:
        """Key of a segment sent by the client."""
        return (self.src, self.sport, self.dst, self.dport)


# Both address conversions are cached: every parsed packet needs two and
# every built one two, and a daemon sees few distinct addresses (the VIP and
# its clients). A hit costs 0.1 us, the conversion 0.6-1.3 us.
@functools.lru_cache(maxsize=4096)
def _ip(b: bytes) -> str:
    return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"


# The most a queue copies of a packet (nfqueue.MAX_COPY): 64 KB less a
# netlink attribute's header.
QUEUE_COPY_LIMIT = 0xFFFF - 4


def parse(buf: bytes | bytearray) -> Segment:
    """Parse an IPv4/TCP packet; raise MalformedPacket for anything unsafe to touch."""
    n = len(buf)
    if n < 20:
        raise MalformedPacket("shorter than an IPv4 header")
    vihl, _tos, total_len, _id, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(buf, 0)
    if vihl >> 4 != 4:
        raise MalformedPacket("not IPv4")
    ihl = (vihl & 0x0F) * 4
    if ihl < 20:
        raise MalformedPacket("IHL below 5")
    if total_len > n:
        raise MalformedPacket("truncated copy: IP total length %d > %d bytes" % (total_len, n))
    if total_len < ihl + 20:
        if total_len == 0 and n >= QUEUE_COPY_LIMIT:
            # (nfqueue.py: a BIG TCP packet, cut at the queue's copy range)
            raise MalformedPacket("IP total length 0 in a %d-byte copy: a BIG TCP packet over 64 KB" % n)
        raise MalformedPacket("IP total length too small for a TCP header")
    if proto != 6:
        raise MalformedPacket("not TCP")
    if frag & 0x3FFF:
        raise MalformedPacket("IP fragment")
    sport, dport, seq, ack, off_byte, flags, window, _tcsum, _urg = _TCP.unpack_from(buf, ihl)
    doff = (off_byte >> 4) * 4
    if doff < 20:
        raise MalformedPacket("TCP data offset below 5")
    if ihl + doff > total_len:
        raise MalformedPacket("TCP header overruns the packet")
    seg = Segment(_ip(src), _ip(dst), sport, dport, seq, ack, flags, window,
                  ihl, ihl, doff, total_len, total_len - ihl - doff)
    if doff > 20:
        _parse_options(buf, ihl + 20, ihl + doff, seg)
    return seg


def _parse_options(buf: bytes | bytearray, i: int, end: int, seg: Segment) -> None:
    while i < end:
        kind = buf[i]
        if kind == OPT_EOL:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedPacket("TCP option %d has no length byte" % kind)
        olen = buf[i + 1]
        if olen < 2 or i + olen > end:
            raise MalformedPacket("TCP option %d overruns the header" % kind)
        if kind == OPT_TS:
            if olen != 10:
                raise MalformedPacket("timestamp option of length %d" % olen)
            seg.ts_off = i + 2
            seg.tsval, seg.tsecr = struct.unpack_from("!II", buf, i + 2)
        elif kind == OPT_SACK:
            if (olen - 2) % 8 or olen < 10:
                raise MalformedPacket("SACK option of length %d" % olen)
            seg.sack_off = i
            seg.sack_blocks = tuple(
                struct.unpack_from("!II", buf, j) for j in range(i + 2, i + olen, 8))
        elif kind == OPT_MSS and olen == 4:
            seg.mss = struct.unpack_from("!H", buf, i + 2)[0]
        elif kind == OPT_WSCALE and olen == 3:
            seg.wscale = buf[i + 2]
        elif kind == OPT_SACK_OK and olen == 2:
            seg.sack_ok = True
        i += olen


# --- checksums -------------------------------------------------------------

def payload(buf: bytes | bytearray, seg: Segment) -> memoryview:
    """The segment's data bytes."""
    return memoryview(buf)[seg.tcp_off + seg.doff:seg.total_len]


def _ones_complement_sum_py(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The folded 16-bit ones' complement sum (RFC 1071), plus ``start``.

    Computed as one big integer mod 0xFFFF (2**16 is 1 mod 0xFFFF, so every
    16-bit word counts once): a 64 KB GSO packet costs ~0.2 ms, not the
    milliseconds of a word-by-word loop."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    v = int.from_bytes(data, "big") + start
    if not v:
        return 0
    s = v % 0xFFFF
    return s or 0xFFFF


def _native() -> Any:
    """nfq_sttcp/_csum.c, or None when it is not built or
    NFQ_STTCP_PURE_CSUM=1 asks for the pure versions (to measure the
    difference). Every user of the extension takes it from here."""
    if os.environ.get("NFQ_STTCP_PURE_CSUM"):
        return None
    try:
        from . import _csum
    except ImportError:  # not built: the pure versions give the same answers
        return None
    return _csum


native = _native()
# The same sum in C, ~15 times faster: every packet a handler rewrites needs
# it whole (see with_correct_checksum).
ones_complement_sum = native.ones_complement_sum if native is not None else _ones_complement_sum_py
_tcp_fixed = native.tcp_fixed if native is not None else None


def _pseudo_sum(buf: bytes | bytearray, seg: Segment) -> int:
    """The folded sum of the pseudo-header (addresses, protocol, TCP length),
    in 1..0xFFFF as ones_complement_sum gives it: 0.8 against 1.3 us built
    as bytes and summed (every inbound clone needs it, see checksum_state)."""
    a = int.from_bytes(buf[12:20], "big")
    v = (a >> 48) + ((a >> 32) & 0xFFFF) + ((a >> 16) & 0xFFFF) + (a & 0xFFFF) + 6 + seg.total_len - seg.tcp_off
    while v > 0xFFFF:
        v = (v & 0xFFFF) + (v >> 16)
    return v


def tcp_checksum(buf: bytes | bytearray, seg: Segment) -> int:
    """The correct TCP checksum of ``buf`` (its checksum field is ignored).

    Summed in place (a memoryview, no copy of a 64 KB packet): the field's
    own value is taken back out by adding its complement, which is
    subtracting it in ones' complement arithmetic."""
    field = int.from_bytes(buf[seg.csum_off:seg.csum_off + 2], "big")
    body = memoryview(buf)[seg.tcp_off:seg.total_len]
    return (~ones_complement_sum(body, _pseudo_sum(buf, seg) + (~field & 0xFFFF))) & 0xFFFF


def tcp_checksum_ok(buf: bytes | bytearray, seg: Segment) -> bool:
    return ones_complement_sum(memoryview(buf)[seg.tcp_off:seg.total_len], _pseudo_sum(buf, seg)) == 0xFFFF


CSUM_OK, CSUM_PARTIAL, CSUM_BAD = "ok", "partial", "bad"
_CSUM_STATES = (CSUM_OK, CSUM_PARTIAL, CSUM_BAD)
_tcp_state = getattr(native, "tcp_state", None)  # (None: not built, or built before it)


def checksum_state(buf: bytes | bytearray, seg: Segment) -> str:
    """Where a received segment's TCP checksum stands, before we rewrite it.

    CSUM_PARTIAL: the field holds only the folded pseudo-header sum, as the
    kernel leaves it in a packet it has not completed (NFQA_SKB_CSUMNOTREADY:
    one a local stack made and a veth carried, or one GRO merged after it
    checked every part). Nothing was checked on a wire for it to fail.
    CSUM_OK: the whole sum checks. CSUM_BAD: neither, so the bytes changed
    on a link. The cheap test first: in the lab every packet is partial."""
    if _tcp_state is not None:  # the same test in C: 0.3 against 1.3 us
        return _CSUM_STATES[_tcp_state(buf, seg.tcp_off, seg.total_len)]
    field = int.from_bytes(buf[seg.csum_off:seg.csum_off + 2], "big")
    pseudo = _pseudo_sum(buf, seg)
    if field == pseudo or (field == 0 and pseudo == 0xFFFF):  # (+0 and -0)
        return CSUM_PARTIAL
    whole = ones_complement_sum(memoryview(buf)[seg.tcp_off:seg.total_len], pseudo)
    return CSUM_OK if whole == 0xFFFF else CSUM_BAD


def changed_on_a_link(buf: bytes | bytearray, seg: Segment, kernel_checked: Optional[bool] = None) -> bool:
    """Did a received segment's bytes change on the way? ``kernel_checked``
    is the kernel's word on it (NFQA_SKB_INFO, see nfqueue.py): True, it was
    checked already or never went over a wire unfinished (nothing to sum: a
    NIC's LRO may leave a stale field in a merged segment it checked); False,
    unchecked, so the whole sum must check; None, no word, so the field
    decides (checksum_state)."""
    if kernel_checked is None:
        return checksum_state(buf, seg) == CSUM_BAD
    return not kernel_checked and not tcp_checksum_ok(buf, seg)


def with_correct_checksum(data: bytes | bytearray) -> bytes:
    """The packet with its TCP checksum recomputed from scratch.

    Every rewritten or injected packet passes here: in C it is one copy and
    one pass (0.2 us for a small packet, against 6 us parsed in Python).
    The pure path stays for what C cannot frame, and says why in its error."""
    if _tcp_fixed is not None:
        fixed = _tcp_fixed(data)
        if fixed is not None:
            return fixed
    buf = bytearray(data)
    seg = parse(buf)
    buf[seg.csum_off:seg.csum_off + 2] = tcp_checksum(buf, seg).to_bytes(2, "big")
    return bytes(buf)


def split(data: bytes | bytearray, max_payload: int, acked: Optional[int] = None) -> list[bytes]:
    """A segment cut into segments of at most ``max_payload`` data bytes each,
    with correct checksums; FIN and PSH go on the last piece only. Pieces
    that end at or before sequence number ``acked`` are left out (the
    receiver has them); a segment that needs no cutting is returned whole.

    A GSO packet (up to 64 KB, queued whole) is bigger than the link's MTU:
    sent as it is through a raw socket it fails with EMSGSIZE."""
    seg = parse(data)
    if seg.payload_len <= max_payload or max_payload <= 0:
        return [with_correct_checksum(data)]
    head = bytearray(data[:seg.tcp_off + seg.doff])
    body = bytes(payload(data, seg))
    out = []
    for off in range(0, len(body), max_payload):
        chunk = body[off:off + max_payload]
        last = off + max_payload >= len(body)
        end = seg.seq + off + len(chunk) + (1 if last and seg.flags & FIN else 0)  # (the FIN counts)
        if acked is not None and seq_le(end & MASK, acked):
            continue
        h = bytearray(head)
        h[2:4] = (len(h) + len(chunk)).to_bytes(2, "big")
        h[10:12] = ip_checksum(h[:seg.ihl]).to_bytes(2, "big")
        h[seg.tcp_off + 4:seg.tcp_off + 8] = ((seg.seq + off) & MASK).to_bytes(4, "big")
        if not last:
            h[seg.tcp_off + 13] &= ~(FIN | PSH) & 0xFF
        out.append(with_correct_checksum(bytes(h) + chunk))
    return out


def ip_checksum(hdr: bytes | bytearray) -> int:
    h = bytearray(hdr)
    h[10:12] = b"\0\0"
    return (~ones_complement_sum(h)) & 0xFFFF


def _patch(buf: bytearray, off: int, new: bytes) -> None:
    """Write ``new`` at ``off``. The checksum is left for the driver's whole
    recompute: an RFC 1624 update here cost 2-5 us per field, only to be
    thrown away (and a partial checksum cannot be updated at all)."""
    buf[off:off + len(new)] = new


def set_seq(buf: bytearray, seg: Segment, value: int) -> None:
    value &= MASK
    _patch(buf, seg.tcp_off + 4, value.to_bytes(4, "big"))
    seg.seq = value


def set_ack(buf: bytearray, seg: Segment, value: int) -> None:
    value &= MASK
    _patch(buf, seg.tcp_off + 8, value.to_bytes(4, "big"))
    seg.ack = value


def set_window(buf: bytearray, seg: Segment, value: int) -> None:
    _patch(buf, seg.tcp_off + 14, (value & 0xFFFF).to_bytes(2, "big"))
    seg.window = value & 0xFFFF


def set_tsval(buf: bytearray, seg: Segment, value: int) -> None:
    if seg.ts_off < 0:
        return
    value &= MASK
    _patch(buf, seg.ts_off, value.to_bytes(4, "big"))
    seg.tsval = value


def set_tsecr(buf: bytearray, seg: Segment, value: int) -> None:
    if seg.ts_off < 0:
        return
    value &= MASK
    _patch(buf, seg.ts_off + 4, value.to_bytes(4, "big"))
    seg.tsecr = value


SackMap = Callable[[int, int], Optional[tuple[int, int]]]


def map_sack(buf: bytearray, seg: Segment, fn: SackMap) -> None:
    """Replace each SACK block by ``fn(left, right)``; None removes the block.

    Removed blocks are replaced by NOPs so the header length never changes.
    """
    if seg.sack_off < 0:
        return
    kept = []
    for left, right in seg.sack_blocks:
        m = fn(left, right)
        if m is not None:
            kept.append((m[0] & MASK, m[1] & MASK))
    olen = 2 + 8 * len(seg.sack_blocks)
    if kept:
        new = bytes([OPT_SACK, 2 + 8 * len(kept)]) + b"".join(
            struct.pack("!II", a, b) for a, b in kept)
    else:
        new = b""
    new += bytes([OPT_NOP]) * (olen - len(new))
    _patch(buf, seg.sack_off, new)
    seg.sack_blocks = tuple(kept)
    if not kept:
        seg.sack_off = -1


# --- building segments from scratch --------------------------------------

@functools.lru_cache(maxsize=4096)
def _aton(ip: str) -> bytes:
    parts = ip.split(".")
    if len(parts) != 4:
        raise ValueError("bad IPv4 address %r" % ip)
    return bytes(map(int, parts))


def ts_option(tsval: int, tsecr: int) -> bytes:
    return bytes([OPT_NOP, OPT_NOP, OPT_TS, 10]) + struct.pack("!II", tsval & MASK, tsecr & MASK)


def sack_option(blocks: list[tuple[int, int]]) -> bytes:
    return bytes([OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks)]) + b"".join(
        struct.pack("!II", left & MASK, right & MASK) for left, right in blocks)


def build_segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int,
                  flags: int, window: int, options: bytes = b"", payload: bytes = b"",
                  ttl: int = 64) -> bytes:
    """A complete IPv4/TCP packet with valid IP and TCP checksums."""
    if len(options) % 4:
        options += bytes([OPT_NOP]) * (4 - len(options) % 4)
    doff = 20 + len(options)
    total = 20 + doff + len(payload)
    ip = bytearray(_IPV4.pack(0x45, 0, total, 0, 0x4000, ttl, 6, 0, _aton(src), _aton(dst)))
    ip[10:12] = ip_checksum(ip).to_bytes(2, "big")
    tcp = _TCP.pack(sport, dport, seq & MASK, ack & MASK, (doff // 4) << 4, flags, window & 0xFFFF, 0, 0)
    return with_correct_checksum(bytes(ip) + tcp + options + payload)
