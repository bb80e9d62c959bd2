"""nfnetlink_queue configuration messages the NetfilterQueue library does
not send (pure: bytes in, bytes out; the driver does the I/O).

The library caps the copy range at 4016 bytes (DESIGN.md trap 1) and never
sets NFQA_CFG_F_GSO, so the kernel segments every GSO packet before queueing
it (trap 2): a bulk transfer costs one trip through Python per 1,448 bytes.
With a copy range of 64 KB and F_GSO, our stack's TSO packets and the
clones of GRO'd client packets arrive whole, up to 64 KB in one trip.

The price, which the driver pays: the kernel no longer completes partial
checksums before queueing (NFQA_SKB_CSUMNOTREADY). A locally made packet's
TCP checksum field then holds only the pseudo-header sum, and an incremental
update of it is wrong. Every packet we change or inject gets its checksum
computed from scratch (tcpseg.with_correct_checksum, summed in C by
_csum.c when it is built); packets passed unchanged keep the kernel's own
handling.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, Iterable, Optional

from .tcpseg import QUEUE_COPY_LIMIT

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NFQA_CFG_PARAMS, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 2, 4, 5
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_GSO = 0x4
# NFQNL_MAX_COPY_RANGE: 64 KB less an attribute header. Copying less would not
# save the copy for packets a handler may rewrite: a verdict carrying a
# shorter packet truncates it to that length (nfqnl_mangle trims the skb).
MAX_COPY = QUEUE_COPY_LIMIT
RECV_BYTES = 0x10000 + 0x1000  # one queued 64 KB packet and its metadata


def _attr(kind: int, value: bytes) -> bytes:
    n = 4 + len(value)
    return struct.pack("=HH", n, kind) + value + b"\0" * (-n % 4)


def config_message(queue_num: int, seq: int, copy_range: int = MAX_COPY, gso: bool = True) -> bytes:
    """NFQNL_MSG_CONFIG for ``queue_num``: copy whole packets up to
    ``copy_range`` bytes, and queue GSO packets unsegmented if ``gso``.
    It asks for an acknowledgement (see ack_error)."""
    attrs = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET)) + \
        _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)) + \
        _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO if gso else 0))
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue_num)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                       NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def ack_error(data: bytes, seq: int) -> Optional[int]:
    """The errno the kernel answered message ``seq`` with (0: done), or None
    if ``data`` holds no answer to it."""
    off = 0
    while off + 16 <= len(data):
        length, kind, _flags, mseq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            return None
        if kind == NLMSG_ERROR and mseq == seq and off + 20 <= len(data):
            return -struct.unpack_from("=i", data, off + 16)[0]
        off += (length + 3) & ~3
    return None


# What the kernel says of a queued packet's checksum (NFQA_SKB_INFO, sent
# only to a queue with F_GSO, and only when a flag is set): CSUMNOTREADY, a
# packet it has not completed (the field holds the pseudo-header sum: from a
# local stack, or merged by GRO after every part was checked); NOTVERIFIED,
# nothing has checked it yet. Neither: checked already (a NIC's
# CHECKSUM_UNNECESSARY, whose field may be stale, as hardware LRO leaves it).
NFQA_PAYLOAD, NFQA_SKB_INFO = 10, 14
NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO, NFQA_SKB_CSUM_NOTVERIFIED = 0x1, 0x2, 0x4


def _skb_info_py(msg: bytes) -> Optional[int]:
    """The NFQA_SKB_INFO flags of one queued-packet message (0 when the
    kernel left the attribute out), or None if the message cannot be read.
    The attribute comes before the payload, so the scan stops there. (In C
    as _csum.skb_info: 0.14 against 2-3 us a message.)"""
    if len(msg) < 20:
        return None
    end = min(struct.unpack_from("=I", msg, 0)[0], len(msg))
    off = 20  # netlink header, nfgenmsg
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", msg, off)
        if alen < 4:
            return None
        atype &= 0x3FFF  # (the nested and byte-order bits)
        if atype == NFQA_SKB_INFO:
            return struct.unpack_from("!I", msg, off + 4)[0] if alen >= 8 and off + 8 <= end else None
        if atype == NFQA_PAYLOAD:
            break
        off += (alen + 3) & ~3
    return 0


def _native_skb_info() -> Any:
    from .tcpseg import native  # (the one place that picks C or pure)
    return getattr(native, "skb_info", None) or _skb_info_py


skb_info = _native_skb_info()


# The kernel's per-queue statistics, one line per bound queue (in the reading
# process's network namespace): number, peer port id, packets waiting, copy
# mode, copy range, packets dropped because the queue was full, packets
# dropped because the listener's socket was full, last packet id, 1.
QUEUE_STATS = "/proc/net/netfilter/nfnetlink_queue"


def queue_drops(text: str, queues: Iterable[int]) -> dict[int, tuple[int, int]]:
    """``{queue: (full, socket)}``: the kernel's drop counts for ``queues``.

    Neither kind of drop reaches the handler: with max_len packets waiting
    the kernel drops the next one (unless the queue fails open, which ours
    never ask for), and a listener whose socket buffer is full loses it too.
    A lost clone or reply costs the client a retransmission, and with it
    the backup's view of the connection lags. Unreadable lines are skipped.
    """
    wanted = set(queues)
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 7 or not all(x.isdigit() for x in f[:7]):
            continue
        num = int(f[0])
        if num in wanted:
            out[num] = (int(f[5]), int(f[6]))
    return out


# BIG TCP (Linux 6.3 and later for IPv4) lets a link carry GSO and GRO
# packets beyond 64 KB once gso_ipv4_max_size or gro_ipv4_max_size is raised
# above 65536. Such a packet cannot cross a queue whole: the copy stops at
# MAX_COPY, and its IP total length field reads 0 (the kernel uses the
# skb's length instead). Seen in the lab with 196,608 on lan0: every
# download segment failed to parse, the primary let them out unchecked and
# gave the connection up unprotected, and the backup dropped its own. The
# daemon therefore refuses such links when it starts, and doctor names them.
# A link raised later is caught by the daemon's recheck every
# SIZES_RECHECK_S (driver._recheck_packet_sizes): an error in the log, the
# status degraded, until the link is set back (relist_due: which links).
RTM_GETLINK, RTM_NEWLINK = 18, 16
IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE = 63, 64
QUEUEABLE_PACKET = 65536
_LINK_SIZE_NAMES = {IFLA_GSO_IPV4_MAX_SIZE: "gso_ipv4_max_size", IFLA_GRO_IPV4_MAX_SIZE: "gro_ipv4_max_size"}


def getlink_request(ifindex: int, seq: int) -> bytes:
    """RTM_GETLINK for one link (its answer: parse_link_sizes)."""
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0)
    return struct.pack("=IHHII", 16 + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body


def parse_link_sizes(data: bytes, seq: int) -> Optional[dict[str, int]]:
    """From the kernel's answer to getlink_request ``seq``: the link's
    gso_ipv4_max_size and gro_ipv4_max_size, each where the kernel sent it
    (a kernel before 6.3 sends neither: no IPv4 packet there exceeds 64 KB).
    None if ``data`` holds no link answer to ``seq``; an error answer raises
    OSError with the kernel's errno."""
    err = ack_error(data, seq)
    if err:
        raise OSError(err, os.strerror(err))
    off = 0
    while off + 16 <= len(data):
        length, kind, _flags, mseq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16 or off + length > len(data):
            return None
        if mseq == seq and kind == RTM_NEWLINK and length >= 32:
            out: dict[str, int] = {}
            a, end = off + 32, off + length
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4 or a + alen > end:
                    break
                name = _LINK_SIZE_NAMES.get(atype & 0x3FFF)
                if name is not None and alen >= 8:
                    out[name] = struct.unpack_from("=I", data, a + 4)[0]
                a += (alen + 3) & ~3
            return out
        off += (length + 3) & ~3
    return None


def links_beneath(links: list[tuple[int, str, Optional[int], Optional[int]]], name: str) -> list[str]:
    """``name`` and the links its packets also pass: the one it is stacked
    on (a VLAN's or macvlan's parent, a veth's peer) and the ports or slaves
    of a bridge or bond, and theirs in turn. GRO merges on the device a
    frame arrives on, so a bridge's own sizes tell nothing of its ports'.
    ``links``: (index, name, the index it is stacked on in this namespace
    or None, its master's index or None)."""
    by_index = {i: (n, parent, master) for i, n, parent, master in links}
    index_of = {n: i for i, n, _parent, _master in links}
    todo, seen = [index_of[name]] if name in index_of else [], []
    while todo:
        i = todo.pop(0)
        if i in seen or i not in by_index:
            continue
        seen.append(i)
        parent = by_index[i][1]
        todo += ([parent] if parent is not None else []) + [j for j, (_n, _p, m) in sorted(by_index.items()) if m == i]
    return [by_index[i][0] for i in seen]


def oversize_problems(sizes: dict[str, Optional[dict[str, int]]]) -> list[tuple[str, Optional[str]]]:
    """(link, what is wrong) for each link whose sizes let a packet over
    64 KB reach a queue, and (link, None) for each whose sizes could not be
    read; nothing for the rest."""
    out: list[tuple[str, Optional[str]]] = []
    for ifname, got in sorted(sizes.items()):
        if got is None:
            out.append((ifname, None))
            continue
        big = ["%s %d" % (k, v) for k, v in sorted(got.items()) if v > QUEUEABLE_PACKET]
        if big:
            out.append((ifname, "%s has %s: BIG TCP packets over 64 KB cannot cross an NFQUEUE whole (the copy "
                                "stops at %d bytes), so its connections would go unprotected"
                        % (ifname, ", ".join(big), MAX_COPY)))
    return out


SIZES_OK, SIZES_UNKNOWN = "ok", "unknown"


def size_states(sizes: dict[str, Optional[dict[str, int]]]) -> dict[str, str]:
    """Each link's state for the daemon's recheck: SIZES_OK, SIZES_UNKNOWN,
    or what is wrong (oversize_problems)."""
    states = {n: SIZES_OK for n in sizes}
    for ifname, problem in oversize_problems(sizes):
        states[ifname] = problem or SIZES_UNKNOWN
    return states


def size_raised(state: str) -> bool:
    """Whether a size_states state says the link carries packets over 64 KB."""
    return state not in (SIZES_OK, SIZES_UNKNOWN)


def size_carry(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """``new`` with a raised link's problem kept while the link cannot be
    read: one failed read must neither clear the degraded state nor, when
    it reads raised again, report the link twice."""
    return {n: (old[n] if st == SIZES_UNKNOWN and size_raised(old.get(n, SIZES_OK)) else st)
            for n, st in new.items()}


def size_changes(old: dict[str, str], new: dict[str, str]) -> list[tuple[str, str, str]]:
    """(event, link, what is wrong) for each link whose state moved between
    two rechecks: ``packet_sizes_raised`` (BIG TCP turned on since the
    daemon started, or since the last recheck), ``packet_sizes_restored``
    (at 64 KB again, or readable again and fine), ``packet_sizes_unknown``
    (no longer readable: the link gone or renumbered) or
    ``packet_sizes_link_gone`` (a new listing of the links no longer has it
    beneath ours: removed, or no longer a port of our bridge or bond)."""
    out = [("packet_sizes_link_gone", n, "") for n in sorted(old) if n not in new]
    for ifname, state in sorted(new.items()):
        was = old.get(ifname, SIZES_OK)
        if state == was:
            continue
        if state == SIZES_UNKNOWN:
            out.append(("packet_sizes_unknown", ifname, ""))
        elif state == SIZES_OK:
            out.append(("packet_sizes_restored", ifname, ""))
        else:
            out.append(("packet_sizes_raised", ifname, state))
    return out


# The links are watched by index, read from one listing: a link deleted and
# made again under its name (a bond rebuilt, a container's veth recreated)
# has a new index, and a port added to our bridge is not in the listing. So
# the daemon lists them again when a link cannot be read, and every
# SIZES_RELIST_S (a pyroute2 dump of every link, about 2 ms).
SIZES_RELIST_S = 60.0


def relist_due(states: dict[str, str], listed_at: float, now: float) -> bool:
    """Whether the daemon should list its links again before trusting a
    recheck's ``states``: one cannot be read, or the listing is old."""
    return any(st == SIZES_UNKNOWN for st in states.values()) or now - listed_at >= SIZES_RELIST_S


def oversize_fix(ifname: str) -> str:
    return "ip link set dev %s gso_ipv4_max_size 65536 gro_ipv4_max_size 65536 (iproute2 6.3 or later)" % ifname
