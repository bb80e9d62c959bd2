"""ICMP echo for the backup's host probe (pure: bytes in, bytes out).

While heartbeats are missing, the backup asks the primary's host directly:
a host that answers is alive even if its daemon is silent (see watchdog).
"""

from __future__ import annotations

import socket
import struct
from typing import Optional

from .tcpseg import ones_complement_sum

ECHO_REQUEST, ECHO_REPLY = 8, 0


def echo_request(ident: int, seq: int, payload: bytes = b"nfq-sttcp probe") -> bytes:
    """An ICMP echo request (no IP header: a raw ICMP socket adds it)."""
    body = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + payload
    csum = ~ones_complement_sum(body) & 0xFFFF
    return body[:2] + struct.pack("!H", csum) + body[4:]


def parse_echo_reply(packet: bytes) -> Optional[tuple[str, int, int]]:
    """(source, ident, seq) of an IPv4 packet carrying an ICMP echo reply; None otherwise."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 8 or packet[9] != socket.IPPROTO_ICMP:
        return None
    icmp_type, _code, _csum, ident, seq = struct.unpack_from("!BBHHH", packet, ihl)
    if icmp_type != ECHO_REPLY:
        return None
    return socket.inet_ntoa(packet[12:16]), ident, seq
