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

import socket
import struct
from typing import Optional

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NFQA_CFG_PARAMS, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 2, 4, 5
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_GSO = 0x4
MAX_COPY = 0xFFFF - 4  # NFQNL_MAX_COPY_RANGE: 64 KB less an attribute header
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
