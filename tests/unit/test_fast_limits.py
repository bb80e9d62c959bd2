"""The primary's fast-path limits (PrimaryCore.fast_limits, absorb_fast): the
kernel may let out only what on_outbound would have accepted unchanged.

``kernel_passes`` restates the program's conditions (fastpath.py; the
kernel's own run of them is in tests/netns/test_fast_path.py) so that the
limits can be checked against the core on many made-up segments."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_sttcp import fastpath, tcpseg
from nfq_sttcp.actions import Accept, Drop
from nfq_sttcp.fastpath import FastState, Limits
from nfq_sttcp.config import MAX_PACED_LAG
from nfq_sttcp.primary import REASON_TOO_FAR_BEHIND, PrimaryConfig, PrimaryCore
from nfq_sttcp.rules import render
from nfq_sttcp.config import Config
from nfq_sttcp.seqmath import seq_ge, seq_le
from nfq_sttcp.syncproto import Confirm, ConfirmEntry
from nfq_sttcp.tcpseg import ACK, FIN, PSH, SYN

from .helpers import KEY, VIP, from_server, server_synack

PORTS = frozenset({7000})


def kernel_passes(lim: Limits, next_fast: int, data: bytes) -> bool:
    seg = tcpseg.parse(data)
    ahead = (next_fast - lim.next_slow) & 0xFFFFFFFF  # the program's own position, if 1..2**30 ahead
    expected = next_fast if 0 < ahead <= 1 << 30 else lim.next_slow
    layout = seg.doff == 20 or (seg.doff == 32 and seg.has_ts and seg.sack_off < 0)  # none, or NOP NOP TS
    return (seg.flags in (ACK, ACK | PSH) and seg.payload_len > 0 and layout and seg.seq == expected and seq_le(seg.end_seq, lim.seq_limit)
            and seq_le(seg.ack, lim.ack_limit)
            and seq_le((seg.ack + (seg.window << lim.wscale)) & 0xFFFFFFFF, lim.win_limit)
            and (lim.win_floor is None or seq_ge((seg.ack + (seg.window << lim.wscale)) & 0xFFFFFFFF, lim.win_floor)))


NO_TS = b""  # the options of a connection without timestamps: none after the handshake


def protected(max_lag=256 * 1024, edge=None, ts=True):
    """A primary with one connection (our ISN 5000, the client's 100), its
    handshake confirmed by the backup at output position 5001."""
    p = PrimaryCore(PrimaryConfig(VIP, PORTS, max_lag=max_lag, fast_path=True))
    p.backup_following = True
    synack = server_synack(5000, 100, 7000) if ts else \
        from_server(5000, 101, SYN | ACK, opts=bytes([2, 4, 5, 0xB4, 1, 3, 3, 7]))  # MSS, window scale 7
    p.on_outbound(synack, 0)
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, 5001, (), edge),)), 0)
    p.on_outbound(from_server(5001, 101, payload=b"first", opts=None if ts else NO_TS), 0)  # (the client's ack went by)
    return p


def test_a_confirmed_connection_gets_limits_at_the_backups_point():
    p = protected(max_lag=1000, edge=101 + (300 << 7))
    assert KEY in p.fast_dirty
    lim = p.fast_limits(KEY)
    assert lim == Limits(next_slow=5006, seq_limit=5001 + 1000, ack_limit=101, win_limit=101 + (300 << 7), wscale=7,
                         win_floor=101 + (300 << 7))  # (the edge the first segment showed)
    assert p.conns[KEY].hasher is None  # (no digests: the kernel's bytes never reach us)
    nxt = from_server(5006, 101, payload=b"x" * 900, window=300)
    assert kernel_passes(lim, 5006, nxt) and p.on_outbound(nxt, 0.1) == [Accept()]
    assert not kernel_passes(lim, 5006, from_server(5906, 101, payload=b"x" * 200))  # beyond the lag bound


def test_a_connection_without_timestamps_takes_the_fast_path_too():
    p = protected(ts=False)
    lim = p.fast_limits(KEY)
    assert lim is not None and not p.conns[KEY].has_ts
    nxt = from_server(lim.next_slow, 101, payload=b"x" * 900, window=2000, opts=NO_TS)  # (our stack keeps its edge)
    assert kernel_passes(lim, lim.next_slow, nxt) and p.on_outbound(nxt, 0.1) == [Accept()]
    p.absorb_fast(KEY, FastState(9006, 101, 333, 0, 0, 3, 4000), 5.0)
    assert p.conns[KEY].snd_nxt == 9006 and not p.conns[KEY].has_ts


def test_no_limits_while_deferred_unprotected_closing_or_without_a_backup():
    p = protected(max_lag=100)
    # beyond the lag bound: deferred, and nothing may overtake it
    assert not [a for a in p.on_outbound(from_server(5006, 101, payload=b"x" * 200), 0.1) if isinstance(a, Accept)]
    assert p.conns[KEY].deferred and p.fast_limits(KEY) is None
    p = protected()
    p.on_outbound(from_server(5006, 101, flags=ACK | FIN), 0.1)
    assert p.fast_limits(KEY) is None
    p = protected()
    p.fast_dirty.clear()
    p.set_backup_following(False, 0.1)
    assert KEY in p.fast_dirty and p.fast_limits(KEY) is None
    assert PrimaryCore(PrimaryConfig(VIP, PORTS)).fast_limits(KEY) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 3000)),  # next in order, or an offset
                          st.integers(0, 400), st.integers(0, 2),  # payload, ack offset from 101
                          st.sampled_from([ACK, ACK | PSH, ACK | FIN]), st.integers(0, 1000),
                          st.booleans(), st.integers(0, 2)), min_size=1, max_size=12),
       st.integers(1, 3000), st.booleans(), st.booleans(), st.sampled_from([0.0, 0.005, 0.05]))
def test_what_the_kernel_would_let_out_the_core_accepts_unchanged(segs, lag, with_edge, ts, lag_s):
    """(For segments the kernel would queue, the core decides as always. With
    a paced bound, the 10 ms steps close pace windows: the bound moves with
    the pace, up and, held by the edge already given, never down.)"""
    p = protected(max_lag=lag, edge=101 + (200 << 7) if with_edge else None, ts=ts)
    p.cfg.max_lag_s = lag_s
    next_fast = p.conns[KEY].snd_nxt
    t = 0.1
    for off, n, ack_off, flags, window, confirm, pos_step in segs:
        t += 0.01
        if confirm:
            c = p.conns[KEY]
            p.on_confirm(Confirm((ConfirmEntry(KEY, 101 + ack_off, (c.backup_pos + 500 * pos_step) & 0xFFFFFFFF,
                                               (), None),)), t)
        lim = p.fast_limits(KEY)
        seq = (p.conns[KEY].snd_nxt + (0 if off is None else off - 1500)) & 0xFFFFFFFF
        data = from_server(seq, 101 + ack_off, flags=flags, payload=b"z" * n, window=window, opts=None if ts else NO_TS)
        if lim is not None and kernel_passes(lim, next_fast, data):
            # What the kernel lets out, the core must accept unchanged.
            acts = p.on_outbound(data, t)
            assert [a for a in acts if isinstance(a, (Accept, Drop))] == [Accept()], (lim, tcpseg.parse(data))
            next_fast = (seq + n) & 0xFFFFFFFF
        else:
            p.on_outbound(data, t)


def test_absorbing_what_the_kernel_sent_moves_our_position_ack_and_timestamps():
    p = protected()
    c = p.conns[KEY]
    p.absorb_fast(KEY, FastState(9006, 101, 333, 6000, 1200, 3, 4000), 5.0)
    assert (c.snd_nxt, c.latest_ack, c.last_ack_sent, c.window, c.tsval, c.tsecr, c.last_seen) == \
        (9006, 101, 101, 333, 6000, 1200, 5.0)
    # An older state never moves anything back.
    p.absorb_fast(KEY, FastState(8006, 101, 100, 5500, 1100, 4, 5000), 6.0)
    assert (c.snd_nxt, c.window, c.tsval) == (9006, 333, 6000)
    # A state with no fast segment yet says nothing.
    p.absorb_fast(KEY, FastState(1, 1, 1, 1, 1, 0, 0), 7.0)
    assert c.snd_nxt == 9006 and c.last_seen == 6.0


def test_the_rules_go_in_front_of_the_queue_and_never_into_the_fence():
    cfg = Config(vip=VIP, ports=(7000,), lan_interface="lan0", primary_sync="10.78.0.1", backup_sync="10.78.0.2")
    text = render(cfg, "primary", fast_prog="/run/x/primary-fast")
    lines = [line for line in text.splitlines() if line.startswith("-A STTCP-POUT")]
    assert "-m bpf --object-pinned /run/x/primary-fast -j ACCEPT" in lines[0]
    assert "-m bpf --object-pinned /run/x/primary-fast-gate -j DROP" in lines[1] and "NFQUEUE" in lines[2]
    recording = [line for line in text.splitlines() if line.startswith("-A STTCP-PIN")]
    assert recording == ["-A STTCP-PIN -i lan0 -d 10.77.0.100/32 -p tcp -m multiport --dports 7000 "
                         "-m bpf --object-pinned /run/x/primary-fast-recorder"], "a match with no target"
    assert "bpf" not in render(cfg, "primary", fence=True, fast_prog="/run/x/primary-fast")
    assert "PIN" not in render(cfg, "primary"), "no fast path, no chain of its"
    left = render(cfg, "primary", jumps_present=frozenset({"STTCP-PIN"}))
    assert ":STTCP-PIN - [0:0]" in left and "bpf" not in left, "one an earlier run left is emptied"
    assert len(fastpath.program(3, 4)) % 8 == 0


def test_a_kick_is_a_duplicate_ack_of_what_the_recorder_can_vouch_for():
    key = ("10.77.0.10", 40000, VIP, 7001)
    seen = fastpath.ClientAck(ack=5000, valid=True, seq_end=999, window=900, held=5000)
    pkt = fastpath.kick(key, seen, 5000, 321, True, 777, 4444)
    seg = tcpseg.parse(pkt)
    assert (seg.src, seg.sport, seg.dst, seg.dport) == key
    # Sequence number and timestamp our stack's own (its ack, its echo), never the recorder's.
    assert (seg.seq, seg.ack, seg.flags, seg.window, seg.tsval, seg.tsecr, seg.payload_len) == \
        (321, 5000, tcpseg.ACK, 900, 777, 4444, 0)
    assert tcpseg.tcp_checksum_ok(pkt, seg)
    assert fastpath.kick(key, seen, 6000, 321, True, 777, 4444) is None, "data in flight: the client's next ack retries"
    assert fastpath.kick(key, seen, 4000, 321, True, 777, 4444) is None
    assert fastpath.kick(key, fastpath.ClientAck(5000, False, 0, 0, 5000), 5000, 321, False, 0, 0) is None, \
        "no ack seen"
    for held in (None, 4000):
        assert fastpath.kick(key, fastpath.ClientAck(5000, True, 999, 900, held), 5000, 321, True, 777, 4444) is None, \
            "the gate holds nothing where our output ends: nothing to kick (the fewer kicks, the fewer acks" \
            " taken from a segment TCP has not checked yet)"
    plain = tcpseg.parse(fastpath.kick(key, seen, 5000, 321, False, 0, 0))
    assert not plain.has_ts and plain.ack == 5000


def test_a_bound_far_enough_ahead_held_nothing():
    assert fastpath.may_have_held(1000, 1000 + fastpath.KICK_MARGIN - 1)
    assert not fastpath.may_have_held(1000, 1000 + fastpath.KICK_MARGIN)
    assert fastpath.may_have_held(0xFFFFFF00, 0x100), "across the wrap"
    assert not fastpath.may_have_held(1000, (1000 + (1 << 30)) & 0xFFFFFFFF), "no lag bound: 1 GB ahead"


def test_what_was_sent_is_the_later_of_the_programs_and_the_daemons_positions():
    lim = fastpath.Limits(next_slow=1000, seq_limit=9000, ack_limit=0, win_limit=0, wscale=0)
    assert fastpath.sent_up_to(lim, fastpath.FastState(3000, 0, 0, 0, 0, 1, 2000)) == 3000
    assert fastpath.sent_up_to(lim, fastpath.FastState(900, 0, 0, 0, 0, 1, 2000)) == 1000
    assert fastpath.sent_up_to(lim, fastpath.FastState(1000 + (1 << 30) + 1, 0, 0, 0, 0, 1, 2000)) == 1000


def _confirm_pos(p, pos, now):
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, pos, (), None),)), now)


def test_the_lag_bound_follows_the_backups_pace():
    """With max_lag_s, the bound is as much as the backup wrote in that long
    at its latest pace, never less than max_lag; the fast path's limit and
    the queue's deferral agree on it."""
    p = protected(max_lag=1000)
    p.cfg.max_lag_s = 0.01
    conn = p.conns[KEY]
    assert p.lag_limit(conn) == 5001 + 1000  # no pace yet: the byte bound
    _confirm_pos(p, 5001 + 50_000, 0.005)  # within the first window: no pace yet
    assert p.lag_limit(conn) == 5001 + 50_000 + 1000
    _confirm_pos(p, 5001 + 200_000, 0.02)  # 200 KB in 20 ms: 10 MB/s, 100 KB in 10 ms
    assert conn.backup_pace == pytest.approx(200_000 / 0.02)
    assert p.lag_limit(conn) == 5001 + 200_000 + 100_000
    assert p.fast_limits(KEY).seq_limit == 5001 + 200_000 + 100_000
    # the queue defers exactly what the kernel would hold
    def seg(n):
        return tcpseg.parse(from_server(5001 + 300_000 - 900, 101, payload=b"x" * n))
    assert not p._must_wait_for_backup(conn, seg(900)) and p._must_wait_for_backup(conn, seg(901))
    # The backup slows to a crawl: its pace drops, the bound it was given stays.
    for i, t in enumerate((0.03, 0.04, 0.045), 1):
        _confirm_pos(p, 5001 + 200_000 + 10 * i, t)
    assert conn.backup_pace == pytest.approx(20 / 0.02)
    assert p.lag_limit(conn) == 5001 + 300_010 == p.fast_limits(KEY).seq_limit  # (the last given at 10 MB/s)
    assert not p._must_wait_for_backup(conn, seg(900)), "a resent segment below the old edge is not deferred"
    # ... and moves on from where the backup's own position takes it past that edge
    _confirm_pos(p, 5001 + 310_000, 0.05)
    assert p.lag_limit(conn) == 5001 + 310_000 + 1000


def test_after_a_pause_the_bound_given_stands_and_the_pace_is_measured_again():
    p = protected(max_lag=1000)
    p.cfg.max_lag_s = 0.01
    conn = p.conns[KEY]
    _confirm_pos(p, 5001 + 250_000, 0.02)  # (its window began with the handshake's confirmation, at 0)
    assert conn.backup_pace == pytest.approx(12.5e6)
    given = p.lag_limit(conn)
    assert given == 5001 + 250_000 + 125_000
    # the application pauses for 300 ms (say, for the client's next request), then writes on
    _confirm_pos(p, 5001 + 251_000, 0.32)
    assert conn.backup_pace == pytest.approx(1000 / 0.3) and p.lag_limit(conn) == given
    _confirm_pos(p, 5001 + 451_000, 0.34)  # 200 KB in 20 ms: 10 MB/s
    assert conn.backup_pace == pytest.approx(200_000 / 0.02)
    assert p.lag_limit(conn) == 5001 + 451_000 + 100_000


def test_a_slow_backup_that_moves_is_waited_for_and_a_stopped_one_given_up():
    """lag_hold_s counts from the later of the deferral and the backup's
    last move: a bound given at a fast pace can take the slowed backup
    longer than lag_hold_s to write, and it is not stuck."""
    p = protected(max_lag=1000)
    p.cfg.max_lag_s = 0.01
    conn = p.conns[KEY]
    _confirm_pos(p, 5001 + 300_000, 0.02)  # 15 MB/s: the bound reaches 5001 + 450_000
    assert p.lag_limit(conn) == 5001 + 450_000
    conn.snd_nxt = 5001 + 450_000
    acts = p.on_outbound(from_server(5001 + 450_000, 101, payload=b"y" * 1000), 0.03)
    assert conn.deferred, acts
    t, pos = 0.03, 5001 + 300_000
    while t < 5.0:  # 100 bytes every 100 ms: 150 s to write the lead
        t += 0.1
        pos += 100
        _confirm_pos(p, pos, t)
        p.on_tick(t)
        assert conn.protected, t
    assert conn.deferred
    # it stops: given up lag_hold_s after its last move
    p.on_tick(t + p.cfg.lag_hold_s - 0.05)
    assert conn.protected
    p.on_tick(t + p.cfg.lag_hold_s + 0.05)
    assert not conn.protected and conn.reason == REASON_TOO_FAR_BEHIND


def test_the_paced_bound_is_capped_and_off_without_a_byte_bound():
    p = protected(max_lag=1000)
    p.cfg.max_lag_s = 10.0
    conn = p.conns[KEY]
    _confirm_pos(p, 5001 + 1_000_000, 0.02)
    _confirm_pos(p, 5001 + 2_000_000, 0.04)  # 50 MB/s for 10 s: far beyond the cap
    assert p.lag_limit(conn) == (5001 + 2_000_000 + MAX_PACED_LAG) & 0xFFFFFFFF
    unbounded = protected(max_lag=0)  # no byte bound: no bound at all, the pace's included
    unbounded.cfg.max_lag_s = 0.01
    _confirm_pos(unbounded, 5001 + 1_000_000, 0.02)
    assert unbounded.lag_limit(unbounded.conns[KEY]) is None
    bytes_only = protected(max_lag=1000)  # max_lag_s 0: the byte bound alone, whatever the pace
    _confirm_pos(bytes_only, 5001 + 1_000_000, 0.02)
    _confirm_pos(bytes_only, 5001 + 2_000_000, 0.04)
    assert bytes_only.lag_limit(bytes_only.conns[KEY]) == 5001 + 2_000_000 + 1000
