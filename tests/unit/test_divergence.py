"""Divergence detection: digests of the primary's output ranges against the
backup's own output, whatever the segmentation on each side."""

import random

import pytest

from hypothesis import given, settings, strategies as st

from nfq_sttcp import tcpseg
from nfq_sttcp.actions import Drop, Inject, Log, SendSync
from nfq_sttcp.divergence import OutputChecker, OutputHasher
from nfq_sttcp.primary import REASON_DIVERGED, PrimaryConfig, PrimaryCore
from nfq_sttcp.syncproto import Digest, Diverged
from nfq_sttcp.tcpseg import RST

from .helpers import KEY, VIP, from_client, from_server, server_synack
from .test_cores import PORTS, mapped_backup


def _segments(data, rng, start, max_len=1448):
    out, off = [], 0
    while off < len(data):
        n = rng.randint(1, max_len)
        out.append(((start + off) & 0xFFFFFFFF, data[off:off + n]))
        off += n
    return out


def _run(primary_stream, backup_stream, seed, start_p, start_b, drop_digests=0.0):
    rng = random.Random(seed)
    h, c = OutputHasher(start_p), OutputChecker(start_b)
    delta = (start_p - start_b) & 0xFFFFFFFF
    p_segs, b_segs = _segments(primary_stream, rng, start_p), _segments(backup_stream, rng, start_b)
    mismatch = None
    while p_segs or b_segs:
        if p_segs and rng.random() < 0.5:
            seq, chunk = p_segs.pop(0)
            h.feed(seq, chunk)
            if rng.random() < 0.3:
                h.feed(seq, chunk)  # a retransmission adds nothing
            if rng.random() < 0.4:
                r = h.take()
                if r is not None and rng.random() >= drop_digests:
                    c.expect((r[0] - delta) & 0xFFFFFFFF, r[1], r[2])
        elif b_segs:
            seq, chunk = b_segs.pop(0)
            c.feed(seq, chunk)
        at = c.check()
        if at is not None and mismatch is None:
            mismatch = at
    r = h.take()
    if r is not None:
        c.expect((r[0] - delta) & 0xFFFFFFFF, r[1], r[2])
    at = c.check()
    return mismatch if mismatch is not None else at, c


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=20000), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 1000))
def test_the_same_bytes_never_diverge_whatever_the_segmentation(data, start_p, start_b, seed):
    mismatch, c = _run(data, data, seed, start_p, start_b)
    assert mismatch is None
    assert not c.pending


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=20000), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 1000), st.data())
def test_one_different_byte_is_found_in_the_range_that_holds_it(data, start_p, start_b, seed, pick):
    pos = pick.draw(st.integers(0, len(data) - 1))
    other = bytearray(data)
    other[pos] ^= 0x5A
    mismatch, _c = _run(data, bytes(other), seed, start_p, start_b)
    assert mismatch is not None
    assert ((start_b + pos) - mismatch) & 0xFFFFFFFF < 20000  # the range starts at or before the byte


def test_lost_digests_leave_ranges_unverified_never_a_false_alarm():
    data = bytes(range(256)) * 200
    mismatch, c = _run(data, data, 7, 2**32 - 3000, 5, drop_digests=0.5)
    assert mismatch is None and c.skipped > 0


def _primary_with_conn():
    p = PrimaryCore(PrimaryConfig(VIP, PORTS))
    p.backup_following = True
    p.on_outbound(server_synack(5000, 100, 7000), 0)
    return p


def test_a_diverging_backup_is_unprotected_on_both_sides_and_resets_the_client_after_takeover():
    p = _primary_with_conn()
    b = mapped_backup()  # our ISN 900, the primary's 5000
    p.on_outbound(from_server(5001, 101, payload=b"12:00:01.000\n"), 0.1)
    digests = [a.message for a in p.on_batch_end(0.1) if isinstance(a, SendSync)]
    assert isinstance(digests[0], Digest) and digests[0].entries[0].start == 5001
    b.on_outbound(from_server(901, 101, payload=b"12:00:01.003\n"), 0.1)
    acts = b.on_digest(digests[0], 0.1)
    diverged = [a.message for a in acts if isinstance(a, SendSync) and isinstance(a.message, Diverged)]
    assert diverged == [Diverged(KEY, 0)]
    assert b.conns[KEY].reason.startswith("diverged") and not b.conns[KEY].protected
    assert any(isinstance(a, Log) and a.event == "connection_diverged" for a in acts)
    p.on_diverged(diverged[0], 0.2)
    assert p.conns[KEY].reason == REASON_DIVERGED
    # After a takeover the client gets a reset exactly at its receive point,
    # never our (different) bytes.
    b.activate(0.3)
    out = b.on_outbound(from_server(914, 101, payload=b"12:00:02.003\n"), 0.3)
    assert any(isinstance(a, Drop) for a in out) and not any(isinstance(a, Inject) for a in out)
    acts = b.on_inbound(from_client(101, 5014, payload=b"next\n"), 0.4)
    rst = [tcpseg.parse(a.packet) for a in acts if isinstance(a, Inject)]
    assert any(isinstance(a, Drop) for a in acts)
    assert len(rst) == 1 and rst[0].flags & RST and rst[0].seq == 5014 and rst[0].src == VIP


def test_a_deterministic_backup_stays_protected():
    p = _primary_with_conn()
    b = mapped_backup()
    for i in range(5):
        msg = b"line %d\n" % i
        p.on_outbound(from_server(5001 + 7 * i, 101, payload=msg), 0.1 + i)
        b.on_outbound(from_server(901 + 7 * i, 101, payload=msg), 0.1 + i)
        for d in [a.message for a in p.on_batch_end(0.1 + i) if isinstance(a, SendSync)]:
            assert not [a for a in b.on_digest(d, 0.1 + i) if isinstance(a, SendSync)]
    assert b.conns[KEY].protected and b.conns[KEY].checker.base == 901 + 35


@pytest.mark.parametrize("fast_path", [False, True])
def test_a_primary_with_the_fast_path_tells_the_backup_that_no_digests_follow(fast_path):
    """The backup learns it from the ISN message, so a fast path set on the
    primary alone costs no protection; the primary's digests, when it says
    they follow, are still awaited (and their absence ends protection)."""
    from nfq_sttcp.backup import UNPROTECTED_UNVERIFIABLE, BackupConfig, BackupCore
    from nfq_sttcp.divergence import MAX_AHEAD
    from nfq_sttcp.syncproto import ConnIsn
    from .helpers import client_syn
    p = PrimaryCore(PrimaryConfig(VIP, PORTS, fast_path=fast_path))
    p.backup_following = True
    isn = [a.message for a in p.on_outbound(server_synack(5000, 100, 7000), 0)
           if isinstance(a, SendSync) and isinstance(a.message, ConnIsn)]
    assert len(isn) == 1 and isn[0].digests is not fast_path
    b = BackupCore(BackupConfig(VIP, PORTS))
    b.on_inbound(client_syn(100), 0)
    b.on_outbound(server_synack(900, 100, 50), 0)
    b.on_conn_isn(isn[0], 0)
    conn = b.conns[KEY]
    assert (conn.checker is None) is fast_path
    chunk, seq = b"z" * 60000, 901
    while (seq - 901) <= MAX_AHEAD:  # our output, and no digest ever arrives
        b.on_outbound(from_server(seq, 101, payload=chunk), 1)
        seq += len(chunk)
    b.on_tick(2)
    if fast_path:
        assert conn.protected, conn.reason
    else:
        assert not conn.protected and conn.reason == UNPROTECTED_UNVERIFIABLE


def test_output_fed_from_a_mutable_buffer_is_copied_not_referenced():
    """The checker keeps views of immutable packets; a bytearray handed in and
    reused afterwards must not change what it checks."""
    data = bytes(range(256)) * 40
    h, c = OutputHasher(100), OutputChecker(100)
    h.feed(100, data)
    scratch = bytearray(data)
    c.feed(100, memoryview(scratch)[:5000])
    c.feed(5100, memoryview(scratch)[5000:])
    scratch[:] = bytes(len(scratch))  # the buffer is reused for something else
    c.expect(*h.take())
    assert c.check() is None and not c.pending and c.size == 0


def test_crc32c_matches_the_standard_check_value_in_c_and_in_python():
    """CRC-32C("123456789") is 0xE3069283 (the Castagnoli polynomial's check
    value); both daemons must compute the same digest, built or not."""
    from nfq_sttcp import divergence
    assert divergence._crc32c_py(b"123456789") == 0xE3069283
    assert divergence.crc32c(b"123456789") == 0xE3069283


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=300))
def test_crc32c_in_c_agrees_with_python_and_continues_across_pieces(a, b):
    from nfq_sttcp import divergence
    whole = divergence._crc32c_py(a + b)
    assert divergence.crc32c(a + b) == whole
    assert divergence.crc32c(b, divergence.crc32c(a)) == whole
    assert divergence._crc32c_py(memoryview(b), divergence._crc32c_py(a)) == whole


def test_crc32c_in_three_streams_agrees_at_every_size_around_the_split():
    """_csum.c runs buffers of 1536 bytes and more as three streams and joins
    them: the join must be exact whatever the length and the starting value."""
    from nfq_sttcp import divergence
    rng = random.Random(5)
    for n in list(range(1528, 1560)) + [4095, 4096, 4097, 65226, 65535]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        value = rng.getrandbits(32)
        assert divergence.crc32c(data, value) == divergence._crc32c_py(data, value), n
