"""Segment builders for the unit tests (pure, no I/O)."""

from nfq_sttcp import tcpseg
from nfq_sttcp.tcpseg import ACK, SYN

CLIENT, VIP = "10.77.0.10", "10.77.0.100"
CPORT, SPORT = 40000, 7000
KEY = (CLIENT, CPORT, VIP, SPORT)
SYN_OPTS = bytes([2, 4, 5, 0xB4, 4, 2]) + tcpseg.ts_option(0, 0)[2:] + bytes([1, 3, 3, 7])


def syn_opts(tsval, tsecr=0, wscale=7):
    return bytes([2, 4, 5, 0xB4, 4, 2]) + bytes([8, 10]) + tsval.to_bytes(4, "big") + tsecr.to_bytes(4, "big") \
        + bytes([1, 3, 3, wscale])


def from_client(seq, ack=0, flags=ACK, payload=b"", tsval=1000, tsecr=0, opts=None, window=1000, sack=()):
    o = opts if opts is not None else tcpseg.ts_option(tsval, tsecr)
    if sack:
        o += bytes([1, 1, 5, 2 + 8 * len(sack)]) + b"".join(
            l.to_bytes(4, "big") + r.to_bytes(4, "big") for l, r in sack)
    return tcpseg.build_segment(CLIENT, VIP, CPORT, SPORT, seq, ack, flags, window, o, payload)


def from_server(seq, ack, flags=ACK, payload=b"", tsval=5000, tsecr=1000, opts=None, window=2000, sack=()):
    o = opts if opts is not None else tcpseg.ts_option(tsval, tsecr)
    if sack:
        o += bytes([1, 1, 5, 2 + 8 * len(sack)]) + b"".join(
            l.to_bytes(4, "big") + r.to_bytes(4, "big") for l, r in sack)
    return tcpseg.build_segment(VIP, CLIENT, SPORT, CPORT, seq, ack, flags, window, o, payload)


def client_syn(isn, tsval=1000):
    return from_client(isn, 0, SYN, opts=syn_opts(tsval))


def server_synack(isn, client_isn, tsval, tsecr=1000, wscale=7):
    return from_server(isn, client_isn + 1, SYN | ACK, opts=syn_opts(tsval, tsecr, wscale))
