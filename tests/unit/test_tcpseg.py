"""The packet core against scapy as the oracle (fields and checksums)."""

import dataclasses
import struct

import pytest
from hypothesis import assume, given, settings, strategies as st
from scapy.layers.inet import IP, TCP

from nfq_sttcp import tcpseg
from nfq_sttcp.seqmath import MOD
from nfq_sttcp.tcpseg import MalformedPacket

u32 = st.integers(0, MOD - 1)
port = st.integers(1, 65535)

option = st.one_of(
    st.tuples(st.just("NOP"), st.none()),
    st.tuples(st.just("MSS"), st.integers(536, 9000)),
    st.tuples(st.just("WScale"), st.integers(0, 14)),
    st.tuples(st.just("SAckOK"), st.just(b"")),
    st.tuples(st.just("Timestamp"), st.tuples(u32, u32)),
    st.tuples(st.just("SAck"), st.lists(u32, min_size=2, max_size=8).filter(lambda v: len(v) % 2 == 0).map(tuple)),
)


def oracle_ok(raw: bytes) -> bool:
    """Scapy recomputes the checksum; ours must equal it."""
    p = IP(raw)
    got = p[TCP].chksum
    del p[TCP].chksum
    return IP(bytes(p))[TCP].chksum == got


@st.composite
def packets(draw):
    opts = draw(st.lists(option, max_size=5))
    opts = [(k, v) if v is not None else (k, None) for k, v in opts]
    payload = draw(st.binary(max_size=64))
    p = IP(src="10.77.0.10", dst="10.77.0.100", id=draw(st.integers(0, 65535))) / TCP(
        sport=draw(port), dport=draw(port), seq=draw(u32), ack=draw(u32), flags=draw(st.integers(0, 0x3F)),
        window=draw(st.integers(0, 65535)), options=[(k, v) for k, v in opts]) / payload
    raw = bytes(p)
    assume(len(IP(raw)[TCP].options) == len(opts))  # scapy may drop what does not fit in 40 bytes
    return raw


@settings(max_examples=300, deadline=None)
@given(packets())
def test_parse_matches_scapy(raw):
    seg = tcpseg.parse(raw)
    p = IP(raw)
    t = p[TCP]
    assert (seg.src, seg.dst, seg.sport, seg.dport) == (p.src, p.dst, t.sport, t.dport)
    assert (seg.seq, seg.ack, seg.flags, seg.window) == (t.seq, t.ack, int(t.flags), t.window)
    assert seg.payload_len == len(bytes(t.payload))
    opts = dict((k, v) for k, v in t.options)
    if "Timestamp" in opts:
        assert (seg.tsval, seg.tsecr) == opts["Timestamp"]
    else:
        assert not seg.has_ts
    if "SAck" in opts:
        flat = tuple(x for b in seg.sack_blocks for x in b)
        assert flat == tuple(opts["SAck"])
    assert tcpseg.tcp_checksum_ok(raw, seg)


@settings(max_examples=300, deadline=None)
@given(packets(), u32, u32, u32, u32, st.integers(0, MOD - 1))
def test_rewrites_are_exact_and_the_recomputed_checksum_is_right(raw, seq, ack, tsval, tsecr, shift):
    """The set_* rewrites leave the checksum to the driver, which recomputes
    it whole for every packet it sends (with_correct_checksum)."""
    buf = bytearray(raw)
    seg = tcpseg.parse(buf)
    tcpseg.set_seq(buf, seg, seq)
    tcpseg.set_ack(buf, seg, ack)
    tcpseg.set_tsval(buf, seg, tsval)
    tcpseg.set_tsecr(buf, seg, tsecr)
    tcpseg.map_sack(buf, seg, lambda l, r: ((l + shift) % MOD, (r + shift) % MOD) if l % 3 else None)
    buf = bytearray(tcpseg.with_correct_checksum(buf))
    assert oracle_ok(bytes(buf))
    again = tcpseg.parse(buf)
    t = IP(bytes(buf))[TCP]
    assert (again.seq, again.ack) == (seq, ack) == (t.seq, t.ack)
    if again.has_ts:
        assert dict(t.options)["Timestamp"] == (tsval, tsecr)
    assert bytes(t.payload) == bytes(IP(raw)[TCP].payload)


def test_timestamp_at_odd_offset_is_rewritten_exactly():
    # No NOP padding: the TS option starts at an odd offset in the header.
    raw = bytes(IP(src="1.2.3.4", dst="5.6.7.8") / TCP(options=[("WScale", 7), ("Timestamp", (1, 2))]) / b"abc")
    buf = bytearray(raw)
    seg = tcpseg.parse(buf)
    assert seg.ts_off % 2 == 1
    tcpseg.set_tsval(buf, seg, 0xFFFFFFFE)
    tcpseg.set_tsecr(buf, seg, 0x12345679)
    buf = bytearray(tcpseg.with_correct_checksum(buf))
    assert oracle_ok(bytes(buf))
    assert dict(IP(bytes(buf))[TCP].options)["Timestamp"] == (0xFFFFFFFE, 0x12345679)


def test_sack_blocks_removed_become_nops():
    raw = bytes(IP() / TCP(flags="A", options=[("NOP", None), ("NOP", None), ("SAck", (10, 20, 30, 40))]))
    buf = bytearray(raw)
    seg = tcpseg.parse(buf)
    tcpseg.map_sack(buf, seg, lambda l, r: None)
    assert oracle_ok(tcpseg.with_correct_checksum(buf))
    again = tcpseg.parse(buf)
    assert again.sack_off == -1 and again.sack_blocks == ()
    assert len(buf) == len(raw)


def test_build_segment_is_valid_for_scapy():
    raw = tcpseg.build_segment("10.77.0.100", "10.77.0.10", 7000, 5555, MOD - 1, 17, tcpseg.ACK, 512,
                               tcpseg.ts_option(MOD - 2, 9))
    p = IP(raw)
    assert oracle_ok(raw)
    assert p[TCP].seq == MOD - 1 and dict(p[TCP].options)["Timestamp"] == (MOD - 2, 9)
    del p.chksum
    assert IP(bytes(p)).chksum == IP(raw).chksum


def test_with_correct_checksum_repairs_a_partial_checksum():
    raw = bytearray(bytes(IP() / TCP() / b"data"))
    seg = tcpseg.parse(raw)
    raw[seg.csum_off:seg.csum_off + 2] = b"\x12\x34"
    assert not tcpseg.tcp_checksum_ok(raw, seg)
    assert oracle_ok(tcpseg.with_correct_checksum(raw))


good = bytes(IP(src="1.1.1.1", dst="2.2.2.2") / TCP(options=[("Timestamp", (1, 2))]) / b"hello")


@pytest.mark.parametrize("mangle,why", [
    (lambda b: b[:10], "shorter than an IPv4 header"),
    (lambda b: b[:30], "truncated"),
    (lambda b: bytes([0x65]) + b[1:], "not IPv4"),
    (lambda b: bytes([0x44]) + b[1:], "IHL"),
    (lambda b: b[:9] + bytes([17]) + b[10:], "not TCP"),
    (lambda b: b[:6] + b"\x20\x00" + b[8:], "fragment"),
    (lambda b: b[:32] + bytes([0x30]) + b[33:], "data offset"),
    (lambda b: b[:32] + bytes([0xF0]) + b[33:], "overruns"),
    (lambda b: b[:2] + struct.pack("!H", 30) + b[4:], "too small"),
    (lambda b: b[:2] + struct.pack("!H", 0) + b[4:], "too small"),
    # a BIG TCP packet, cut at the queue's copy range, its total length 0
    (lambda b: (b[:2] + struct.pack("!H", 0) + b[4:]).ljust(0xFFFF - 4, b"x"), "BIG TCP"),
])
def test_malformed_packets_are_refused(mangle, why):
    with pytest.raises(MalformedPacket, match=why):
        tcpseg.parse(mangle(good))


def test_overrunning_options_are_refused():
    raw = bytearray(good)
    seg = tcpseg.parse(raw)
    raw[40] = 8  # TS kind ...
    raw[41] = 40  # ... claiming 40 bytes
    with pytest.raises(MalformedPacket, match="overruns"):
        tcpseg.parse(raw)
    assert seg.has_ts


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_raise_anything_else(data):
    try:
        tcpseg.parse(data)
    except MalformedPacket:
        pass


def test_split_cuts_a_gso_sized_segment_into_mss_pieces_with_correct_checksums():
    from scapy.layers.inet import IP, TCP
    data = bytes(range(256)) * 20  # 5120 bytes
    pkt = tcpseg.build_segment("10.77.0.100", "10.77.0.10", 7000, 40000, 0xFFFFF000, 77,
                               tcpseg.ACK | tcpseg.PSH | tcpseg.FIN, 500, tcpseg.ts_option(1, 2), data)
    pieces = tcpseg.split(pkt, 1448)
    assert [len(tcpseg.payload(p, tcpseg.parse(p))) for p in pieces] == [1448, 1448, 1448, 776]
    got = b""
    for i, p in enumerate(pieces):
        s = IP(p)
        fresh = IP(p)
        del fresh[IP].chksum, fresh[TCP].chksum
        assert IP(bytes(fresh))[TCP].chksum == s[TCP].chksum and IP(bytes(fresh))[IP].chksum == s[IP].chksum
        assert s[TCP].seq == (0xFFFFF000 + 1448 * i) & 0xFFFFFFFF  # wraps
        last = i == len(pieces) - 1
        assert bool(s[TCP].flags & 0x01) == last and bool(s[TCP].flags & 0x08) == last
        got += bytes(s[TCP].payload)
    assert got == data
    assert tcpseg.split(pkt, 6000) == [pkt]
    # pieces the receiver has (ending at or before ``acked``) are left out, wrapping included
    assert tcpseg.split(pkt, 1448, acked=(0xFFFFF000 + 2896) & 0xFFFFFFFF) == pieces[2:]
    assert tcpseg.split(pkt, 1448, acked=(0xFFFFF000 + 2895) & 0xFFFFFFFF) == pieces[1:]
    # the last piece's FIN counts: its data acked but not the FIN, it stays
    assert tcpseg.split(pkt, 1448, acked=(0xFFFFF000 + 5120) & 0xFFFFFFFF) == pieces[3:]
    assert tcpseg.split(pkt, 1448, acked=(0xFFFFF000 + 5121) & 0xFFFFFFFF) == []


SUMS = [tcpseg._ones_complement_sum_py, tcpseg.ones_complement_sum]


@pytest.mark.parametrize("csum", SUMS, ids=["python", "built"])
def test_ones_complement_sum_matches_the_word_loop(csum):
    import random
    import struct
    rnd = random.Random(7)
    for n in (0, 1, 2, 3, 5, 7, 40, 1501, 65000):
        b = bytes(rnd.getrandbits(8) for _ in range(n))
        padded = b + b"\0" * (n % 2)
        s = sum(struct.unpack("!%dH" % (len(padded) // 2), padded))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        assert csum(b) == s
        assert csum(bytearray(b)) == s and csum(memoryview(b)) == s
    assert csum(b"\xff\xff\xff\xff") == 0xFFFF
    assert csum(b"\0\0") == 0


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(0, 0x1FFFE))
def test_the_c_sum_agrees_with_the_python_sum(data, start):
    assert tcpseg.ones_complement_sum(data, start) == tcpseg._ones_complement_sum_py(data, start)


def test_the_c_sum_is_built():
    """setup.py builds nfq_sttcp/_csum.c (optional, so a failed build would
    otherwise pass unseen and leave every handler ~15 times slower per byte)."""
    import nfq_sttcp._csum  # noqa: F401  (fails here if the build step is missing)
    from nfq_sttcp import divergence
    assert tcpseg.ones_complement_sum is nfq_sttcp._csum.ones_complement_sum
    assert divergence.crc32c is nfq_sttcp._csum.crc32c
    assert tcpseg._tcp_state is nfq_sttcp._csum.tcp_state
    from nfq_sttcp import nfqueue
    assert nfqueue.skb_info is nfq_sttcp._csum.skb_info


@settings(max_examples=200)
@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_tcp_checksum_ignores_whatever_its_field_holds(data, field):
    pkt = bytearray(tcpseg.build_segment("10.77.0.10", "10.77.0.100", 40000, 7000, 1, 2, tcpseg.ACK, 100, b"", data))
    seg = tcpseg.parse(pkt)
    want = int.from_bytes(pkt[seg.csum_off:seg.csum_off + 2], "big")  # build_segment's, from a zeroed field
    pkt[seg.csum_off:seg.csum_off + 2] = field.to_bytes(2, "big")
    assert tcpseg.tcp_checksum(pkt, seg) == want
    assert tcpseg.tcp_checksum_ok(pkt, seg) == (field == want or {field, want} == {0, 0xFFFF})  # (+0 and -0)


def _pure_with_correct_checksum(data):
    """with_correct_checksum as it is without the C extension."""
    mp = pytest.MonkeyPatch()
    mp.setattr(tcpseg, "_tcp_fixed", None)
    try:
        return tcpseg.with_correct_checksum(data)
    finally:
        mp.undo()


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(0, 0xFFFF), st.sampled_from([b"", tcpseg.ts_option(5, 6)]),
       st.binary(max_size=8))
def test_the_c_checksum_fix_gives_the_pure_paths_bytes(payload, field, opts, trailer):
    pkt = bytearray(tcpseg.build_segment("10.77.0.10", "10.77.0.100", 40000, 7000, 1, 2, tcpseg.ACK, 100, opts, payload))
    seg = tcpseg.parse(pkt)
    pkt[seg.csum_off:seg.csum_off + 2] = field.to_bytes(2, "big")
    data = bytes(pkt) + trailer  # bytes past the IP total length are kept as they are, by both
    want = _pure_with_correct_checksum(data)
    got = tcpseg.with_correct_checksum(data)
    assert got == want
    assert tcpseg.tcp_checksum_ok(got, tcpseg.parse(got))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_the_c_checksum_fix_never_crashes_and_agrees_where_both_answer(data):
    from nfq_sttcp import _csum
    fixed = _csum.tcp_fixed(data)
    try:
        want = _pure_with_correct_checksum(data)
    except MalformedPacket:
        want = None
    if fixed is None:
        assert want is None  # C declines only what the pure path refuses
    elif want is not None:
        assert fixed == want  # (C does not read TCP options, so it may fix what the pure path refuses)


def test_with_correct_checksum_still_names_what_is_wrong():
    for bad, why in ((b"\x45" + b"\0" * 10, "shorter"), (b"\x60" + b"\0" * 39, "not IPv4")):
        with pytest.raises(MalformedPacket, match=why):
            tcpseg.with_correct_checksum(bad)


def test_checksum_state_tells_a_partial_sum_from_a_changed_packet():
    good = tcpseg.build_segment("10.0.0.1", "10.0.0.2", 1, 2, 7, 8, tcpseg.ACK, 100, b"", b"GOOD")
    seg = tcpseg.parse(good)
    assert tcpseg.checksum_state(good, seg) == tcpseg.CSUM_OK
    changed = good[:-4] + b"EVIL"
    assert tcpseg.checksum_state(changed, seg) == tcpseg.CSUM_BAD
    # as the kernel leaves a packet it has not completed: the pseudo-header sum only
    partial = bytearray(changed)
    pseudo = tcpseg._pseudo_sum(partial, seg)
    partial[seg.csum_off:seg.csum_off + 2] = pseudo.to_bytes(2, "big")
    assert tcpseg.checksum_state(partial, seg) == tcpseg.CSUM_PARTIAL
    assert tcpseg.tcp_checksum_ok(tcpseg.with_correct_checksum(partial), seg)
    # scapy agrees that the good one checks and the changed one does not
    assert IP(good)[TCP].chksum == IP(bytes(IP(good)))[TCP].chksum
    rebuilt = IP(changed)
    del rebuilt[TCP].chksum
    assert IP(bytes(rebuilt))[TCP].chksum != IP(changed)[TCP].chksum


@given(st.binary(min_size=8, max_size=8), st.integers(min_value=20, max_value=65535))
def test_the_pseudo_header_sum_is_the_sum_of_the_pseudo_header(addrs, total_len):
    buf = bytes(12) + addrs + bytes(20)
    seg = tcpseg.parse(tcpseg.build_segment("1.2.3.4", "5.6.7.8", 1, 2, 0, 0, tcpseg.ACK, 0))
    seg = dataclasses.replace(seg, total_len=total_len)
    want = tcpseg.ones_complement_sum(addrs + struct.pack("!HH", 6, total_len - seg.tcp_off))
    assert tcpseg._pseudo_sum(buf, seg) == want


@given(st.binary(max_size=3000), st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=0xFFFF))
def test_checksum_state_in_c_agrees_with_the_pure_version(payload, how, noise):
    assert tcpseg.native is not None and tcpseg._tcp_state is not None
    buf = bytearray(tcpseg.build_segment("10.0.0.1", "10.0.0.2", 1, 2, 7, 8, tcpseg.ACK, 100, b"", payload))
    seg = tcpseg.parse(buf)
    if how == 1:
        buf[seg.csum_off:seg.csum_off + 2] = tcpseg._pseudo_sum(buf, seg).to_bytes(2, "big")
    elif how == 2:
        buf[seg.csum_off:seg.csum_off + 2] = noise.to_bytes(2, "big")
    c = tcpseg.checksum_state(buf, seg)
    pure = tcpseg._tcp_state
    try:
        tcpseg._tcp_state = None
        assert tcpseg.checksum_state(buf, seg) == c
    finally:
        tcpseg._tcp_state = pure
    if how == 1:
        assert c == tcpseg.CSUM_PARTIAL
    with pytest.raises(ValueError):
        pure(bytes(buf), seg.tcp_off, len(buf) + 1)
    with pytest.raises(ValueError):  # (a huge offset must not wrap the bounds test)
        pure(bytes(60), 2**63 - 6, 60)
