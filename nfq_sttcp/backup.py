"""The backup's packet logic: event in, actions out (no I/O).

Inbound (client segments, cloned by the primary; raw PREROUTING) are mapped
from the primary's sequence and timestamp space into the backup's:
``ack -= delta_seq``, SACK blocks likewise, ``TSecr -= delta_ts``.

Outbound (the backup's own replies; mangle POSTROUTING) are held while the
primary lives: copied, dropped, and their ack field reported to the primary.
After takeover they are mapped the other way (``seq += delta_seq``,
``TSval += delta_ts``) and released, for the life of every migrated connection.

The backup fails closed: anything it cannot map is dropped, never sent.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping, Optional

from . import tcpseg
from .control import first_unprotected
from .divergence import OutputChecker
from .fastin import InLimits, InState
from .actions import Accept, Action, Count, Drop, Inject, Log, SendSync
from .seqmath import MASK, seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt, seq_max, seq_min, seq_sub
from .syncproto import MAX_CONFIRMS, MAX_SACK, Confirm, ConfirmEntry, ConnIsn, Digest, Diverged, Unprotect
from .tcpseg import ACK, FIN, RST, SYN, ConnKey, MalformedPacket, Segment

UNPROTECTED_NO_ISN = "primary never sent the ISN"
UNPROTECTED_OPTIONS = "TCP options differ from the primary's"
UNPROTECTED_BEFORE_JOIN = "opened before the backup joined"
UNPROTECTED_DROPPED = "the primary lost this backup for a while and dropped protection"
UNPROTECTED_RESTARTED = "the primary's daemon restarted: its acks went unclamped meanwhile"
UNPROTECTED_DIVERGED = "diverged: our application wrote other bytes than the primary's"
UNPROTECTED_UNVERIFIABLE = "our output ran too far ahead of the primary's to verify"
UNPROTECTED_BY_PRIMARY = "the primary stopped protecting it (it waited too long for us)"
# A connection that changed this recently is confirmed again (a lost
# confirmation would hold the client back until we move again): at the next
# tick, then at doubling intervals, about 5 times in all. Every tick, it was
# 20 times, and at 500 new connections a second the repeats were most of
# what both daemons spent on confirmations.
RECONFIRM_S = 2.0
RECONFIRM_FIRST_S = 0.1
SWEEP_S = 1.0  # how often on_tick looks at every connection (see BackupCore.recent)
TAKEOVER_ACK_PROMPTS = 3
UNPROTECTED_RESET_TRIES = 5  # resets of a connection we cannot migrate, a second apart, until the client answers


# Slots, and hold buffers made only when needed: every tracked object of a
# connection is walked by each full collection of the garbage collector,
# which stalls the loop that sends the heartbeats (13 objects per connection
# on both hosts, 74 ms a collection at 10,000 connections), and an instance
# dict, an empty OrderedDict and an empty list cost memory besides.
_NOTHING_HELD: "Mapping[int, tuple[int, bytes]]" = MappingProxyType({})


@dataclass(slots=True)
class BackupConn:
    key: ConnKey
    created: float
    client_isn: Optional[int] = None
    # our handshake
    isn_b: Optional[int] = None
    tsval_b_syn: Optional[int] = None
    tsval_b_syn_last: Optional[int] = None  # TSval of our latest SYN-ACK (retransmissions)
    established_b: bool = False  # our stack sent something other than a SYN-ACK: it took the handshake
    opts_b: Optional[tuple] = None
    # the primary's handshake
    isn_p: Optional[int] = None
    tsval_p_syn: Optional[int] = None
    opts_p: Optional[tuple] = None
    delta_seq: Optional[int] = None
    delta_ts: int = 0
    generation: int = 0  # the primary's protection generation at the handshake
    digests: bool = True  # the primary sends digests of its output (not with its fast path)
    protected: bool = False
    reason: str = "handshake in progress"
    # what the backup's stack has emitted (backup space)
    snd_max: Optional[int] = None
    rcv_ack: Optional[int] = None
    last_confirmed: Optional[int] = None
    last_window: int = 0
    sack: tuple = ()  # SACK blocks of our latest ack: client bytes we hold beyond a hole
    reported_edge: Optional[int] = None  # window edge last reported to the primary
    last_tsval_b: int = 0
    tsecr_b: Optional[int] = None  # the client TSval our latest ack echoed (reported with it)
    last_tsval_b_at: float = 0.0
    # what the client has shown us
    client_ack_b: Optional[int] = None  # highest client ack mapped into backup space
    stack_ack: Optional[int] = None  # highest ack our stack has been shown (after clamping)
    client_window: int = 0
    client_wscale: int = -1  # from the client's SYN (-1: none offered)
    client_mss: int = 536  # from the client's SYN (RFC 9293's default without one)
    client_tsval: int = 0
    client_max_tsecr: Optional[int] = None  # highest TSval of ours (primary space) the client echoed
    uses_ts: bool = False
    # hold buffers
    # (A factory: dataclasses refuses a default it cannot hash as mutable.)
    held: "Mapping[int, tuple[int, bytes]]" = field(default_factory=lambda: _NOTHING_HELD)  # an OrderedDict while any
    held_bytes: int = 0
    pending_in: "list[bytes] | tuple[()]" = ()
    checker: Optional[OutputChecker] = None  # our output against the primary's digests
    changed_at: float = -1e9  # when our state last moved (see RECONFIRM_S)
    reconfirm_after: float = 0.0  # age of that change at which to confirm it again
    # after takeover
    last_tsval_out: Optional[int] = None
    closing_since: Optional[float] = None
    fin_end: Optional[int] = None  # just past our FIN
    client_fin_end: Optional[int] = None  # just past the client's FIN
    reset: bool = False  # ended by a reset: the client's, at our receive point, or our own after takeover
    reset_probes: int = 0  # after takeover, unprotected: resets sent at our guess (see _reset_unprotected)
    reset_probed_at: float = 0.0
    # for the kernel's inbound path (fastin.py): whether the last client
    # segment we mapped is one the kernel would have mapped the same way,
    # and where the segments we mapped end
    fast_ok: bool = False
    fast_next: Optional[int] = None
    fast_seen: int = 0  # client data segments we mapped as the kernel would have (up to cfg.fast_in_after)

    @property
    def wscale(self) -> int:
        """Our window scale, from our SYN-ACK (0 before it, or without the option)."""
        return self.opts_b[2] if self.opts_b is not None and self.opts_b[2] >= 0 else 0

    @property
    def client_shift(self) -> int:
        """How far the client's window field is shifted: its SYN's scale, in
        use only if our SYN-ACK offered one too (RFC 7323)."""
        if self.client_wscale < 0 or self.opts_b is None or self.opts_b[2] < 0:
            return 0
        return min(self.client_wscale, 14)

    def window_below(self, ack: int) -> int:
        """The window field that, with ``ack`` (ours, at or below the
        client's), puts the right edge where the client put it.

        A backup behind the client's ack is shown an ack no further than its
        own output (DESIGN.md trap 9). With the client's own window beside
        that lower ack, the edge falls short by the whole lag: a client that
        reads slowly (a window below one segment) then holds our stack in
        persist mode, and it catches up on bytes the client already has at
        one window per probe. Seen in the fault matrix: a backup 160 KB
        behind, shown 1 KB windows, stalled the download for 17-30 s after
        the takeover."""
        if self.client_ack_b is None:
            return self.client_window
        shift = self.client_shift
        edge = seq_add(self.client_ack_b, self.client_window << shift)
        room = seq_sub(edge, ack) if seq_ge(edge, ack) else 0
        return min(0xFFFF, room >> shift)

    def fully_closed(self) -> bool:
        """Both FINs sent and acknowledged: nothing is left to say."""
        return (self.fin_end is not None and self.client_ack_b is not None and seq_ge(self.client_ack_b, self.fin_end)
                and self.client_fin_end is not None and self.rcv_ack is not None
                and seq_ge(self.rcv_ack, self.client_fin_end))

    def ended(self) -> bool:
        """Nothing left to protect: both FINs acknowledged, or reset. Such a
        connection lingers (closed_linger_s) but no longer counts as
        unprotected in a status."""
        return self.reset or self.fully_closed()

    def status(self) -> dict[str, object]:
        lag = None
        if self.client_ack_b is not None and self.snd_max is not None and seq_gt(self.client_ack_b, self.snd_max):
            lag = seq_sub(self.client_ack_b, self.snd_max)
        return {"conn": "%s:%d -> %s:%d" % self.key, "protected": self.protected,
                "reason": "" if self.protected else self.reason, "closed": self.ended(),
                "held_segments": len(self.held), "held_bytes": self.held_bytes,
                "behind_bytes": lag or 0, "delta_seq": self.delta_seq, "delta_ts": self.delta_ts,
                # Our output checked against the primary's digests (divergence.py):
                # not for a primary with tuning.fast_path, which sends none.
                "output_checked": self.checker is not None,
                # Positions in our own sequence space, for a stalled
                # connection's post-mortem: what our stack sent and acked,
                # what the client acked, and what our stack was shown of it.
                "positions": {"our_snd_max": self.snd_max, "our_rcv_ack": self.rcv_ack,
                              "client_ack": self.client_ack_b, "shown_to_our_stack": self.stack_ack,
                              "client_window": self.client_window, "our_window": self.last_window}}


@dataclass
class BackupConfig:
    vip: str
    ports: frozenset[int]
    handshake_hold_s: float = 3.0
    ts_margin: int = 0  # added to TSval after takeover, PAWS safety (DESIGN.md trap 6)
    closed_linger_s: float = 30.0
    max_pending_in: int = 256
    max_ack_ahead: int = 1 << 30  # how far a client ack may lie beyond our output (the primary's lag bound + slack)
    fast_inbound: bool = False  # the kernel maps what it can of client segments (fastin.py): keep its entries
    # A connection gets a kernel entry only once we have mapped this many of
    # its client's data segments as the kernel would have: one that sends a
    # request and closes (a new-connection storm) would cost map writes, a
    # read-back and a delete, and the kernel would map none of its segments.
    # Measured, new connections a second (4 clients, alternating labs, 4
    # runs each): 961 with the inbound program on, 1,004 with it off.
    fast_in_after: int = 2


def _opts(seg: Segment) -> tuple:
    return (seg.has_ts, seg.sack_ok, seg.wscale if seg.wscale is not None else -1)


@dataclass
class BackupCore:
    cfg: BackupConfig
    active: bool = False
    conns: dict[ConnKey, BackupConn] = field(default_factory=dict)
    early_isn: dict[ConnKey, tuple[ConnIsn, float]] = field(default_factory=dict)
    unconfirmed: set[ConnKey] = field(default_factory=set)
    # A new mapping is waited for: the primary holds the client's SYN-ACK
    # until we confirm it, so that confirmation skips the batching interval.
    urgent: bool = False
    primary_generation: int = 0
    self_ack_due: set[ConnKey] = field(default_factory=set)
    suspended: str = ""  # why protection is suspended (the primary's daemon is silent), "" if not
    # What on_tick looks at each tick, so that its cost follows what is due,
    # not the connections held: closed ones linger closed_linger_s (at 700
    # new connections a second, 20,000 of them), and a scan of them all every
    # tick took 15 % of the daemon. The rest is swept once a second (SWEEP_S).
    recent: set[ConnKey] = field(default_factory=set)  # changed within RECONFIRM_S
    unmapped: set[ConnKey] = field(default_factory=set)  # created without the primary's ISN yet
    next_sweep: float = 0.0
    fast_in_dirty: set[ConnKey] = field(default_factory=set)  # whose kernel entry (fast_in_entry) may have changed

    # == inbound: client -> service ===========================================

    def on_inbound(self, data: bytes, now: float, csum_checked: Optional[bool] = None) -> list[Action]:
        """``csum_checked``: what the kernel said of the segment's checksum
        (the driver reads NFQA_SKB_INFO). True: checked already, or a packet
        it has not completed (nothing to check); False: not checked yet;
        None: not told, so tcpseg.checksum_state judges from the field."""
        try:
            seg = tcpseg.parse(data)
        except MalformedPacket as e:
            # Fail closed: a clone we cannot map is dropped; the client resends.
            return [Drop("malformed"), Count("malformed_in"), Log("malformed_packet", "debug", {"why": str(e)})]
        if tcpseg.changed_on_a_link(data, seg, csum_checked):
            # TEE clones before the primary's stack checks, and a snooped
            # frame is unchecked too. The rewrite below gets a checksum summed
            # afresh, which would make the changed bytes valid for our stack:
            # drop it before it touches our state. The primary's stack drops
            # its copy, so the client sends it again.
            return [Drop("bad checksum"), Count("bad_checksum_in")]
        if seg.dst != self.cfg.vip or seg.dport not in self.cfg.ports:
            return [Accept(), Count("foreign_in")]
        key = seg.client_key()
        conn = self.conns.get(key)
        if seg.flags & SYN and not seg.flags & ACK:
            if conn is not None and conn.client_isn != seg.seq and conn.closing_since is None \
                    and conn.delta_seq is not None:
                # A SYN into a live connection (forged, or a confused client):
                # our stack answers it with a challenge ACK, which we hold; the
                # connection's state stays as it is.
                return [Accept(), Count("syn_into_live_connection")]
            if self.active and (conn is None or conn.client_isn != seg.seq):
                # Born after takeover: nothing to map. (A PromotedCore protects
                # it with the next backup, as any primary would.)
                self.conns.pop(key, None)
                return [Accept()]
            if conn is None or conn.client_isn != seg.seq:
                conn = self.conns[key] = BackupConn(key, now, client_isn=seg.seq)
                self.unmapped.add(key)
                self._kernel_entry_moved(key)  # (an old connection's entry goes)
                early = self.early_isn.pop(key, None)
                if early is not None:
                    self._set_primary_isn(conn, early[0])
            if seg.has_ts:
                conn.client_tsval = seg.tsval
            if seg.mss:
                conn.client_mss = seg.mss
            conn.client_wscale = -1 if seg.wscale is None else seg.wscale
            return [Accept()]
        if conn is None:
            if self.active:
                return [Accept()]  # not ours to map: our stack resets it, cleanly
            return [Drop("connection opened before the backup joined"), Count("unknown_in")]
        if seg.flags & RST and conn.closing_since is None and conn.rcv_ack is not None and seg.seq == conn.rcv_ack:
            # Only an RST exactly at our receive point ends our state (RFC 5961):
            # a forged one out of the window must not unprotect a connection.
            conn.closing_since = now
            conn.reset = True
            self._kernel_entry_moved(key)
        if conn.delta_seq is None:
            if self.active or conn.reason in (UNPROTECTED_NO_ISN,):
                return [Accept()] if self.active else [Drop("no mapping"), Count("unmapped_in")]
            # Handshake race (DESIGN.md trap 8): hold until the ISN arrives.
            if len(conn.pending_in) >= self.cfg.max_pending_in:
                return [Drop("pending buffer full"), Count("pending_overflow")]
            if not conn.pending_in:
                conn.pending_in = []
            conn.pending_in.append(bytes(data))
            return [Drop("held until the primary's ISN arrives"), Count("pending_in")]
        if self.active and not conn.protected:
            # A connection we could not migrate: answer the client with a reset
            # exactly at its receive point (its ack field, already in the
            # primary's space), so it is accepted at once (RFC 5961).
            if seg.flags & RST or not seg.flags & ACK:
                return [Drop("unprotected connection after takeover")]
            if conn.closing_since is None:
                conn.closing_since = now
            return [Drop("unprotected connection after takeover"), Count("unprotected_reset"),
                    Inject(self._reset(conn, seg.ack), "reset of an unprotected connection")]
        buf, out = self._map_inbound(conn, seg, data)
        return [Accept(buf)] + out

    def on_snooped(self, data: bytes, now: float) -> list[Action]:
        """A client segment seen promiscuously on the LAN, addressed to the
        primary's MAC. A switch floods those once the primary's port is dead,
        so bytes the client sends during the outage reach us (as ST-TCP's
        snooping backup does) instead of waiting out the client's RTO."""
        # A packet socket on a veth hands over CHECKSUM_PARTIAL packets: the
        # checksum field holds only the pseudo-header sum. on_inbound tells
        # those from frames changed on the wire (tcpseg.checksum_state), and
        # the driver sums every packet it injects afresh. Summing it here
        # first, as we once did, made a changed frame valid.
        # Short frames carry Ethernet padding: cut it, or the raw send (which
        # sets the IP length from the buffer) would turn it into payload.
        if len(data) >= 4:
            data = data[:int.from_bytes(data[2:4], "big")]
        out: list[Action] = []
        for a in self.on_inbound(data, now):
            if isinstance(a, Accept):
                out.append(Inject(a.payload if a.payload is not None else bytes(data), "snooped on the LAN"))
            elif not isinstance(a, Drop):
                out.append(a)
        return out + [Count("snooped_in")]

    def _map_inbound(self, conn: BackupConn, seg: Segment,
                     data: bytes) -> tuple[Optional[bytearray], list[Action]]:
        """Rewrite one client segment into the backup's space; return (bytes, extra actions).
        The bytes stay a bytearray: the driver's checksum pass makes the one
        copy it hands the kernel (a 64 KB clone was copied twice more)."""
        assert conn.delta_seq is not None
        out: list[Action] = []
        if not seg.flags & ACK:
            return None, out
        trusted = self._acceptable(conn, seg)
        if trusted:
            if seg.flags & FIN:
                conn.client_fin_end = seg.end_seq
            conn.client_window = seg.window
            if seg.has_ts and (not conn.client_tsval or seq_gt(seg.tsval, conn.client_tsval)):
                # Never backwards: clones (NFQUEUE) and snooped frames (packet
                # socket) reach us by two paths, and the newer can come first.
                # Our stack keeps the newest as ts_recent, and a self-ack
                # echoing an older one fails PAWS, silently (TCP_RFC7323_PAWS).
                conn.client_tsval = seg.tsval
        else:
            out.append(Count("out_of_window_in"))
        buf = bytearray(data)
        tsecr_in = seg.tsecr  # (tcpseg's setters update ``seg`` too: what came in, for the kernel's entry)
        ack_b = seq_sub(seg.ack, conn.delta_seq)
        if trusted and (conn.client_ack_b is None or seq_gt(ack_b, conn.client_ack_b)):
            conn.client_ack_b = ack_b
            self._prune_held(conn)
        clamped = conn.snd_max is not None and seq_gt(ack_b, conn.snd_max)
        if clamped:
            # Backup behind the primary (DESIGN.md trap 9): Linux ignores an ack
            # for data it has not sent, so never show it one. It discards the
            # whole segment with it, payload and all (tcp_ack: "ack of unsent
            # data"), which is why a kernel rewrite (conntrack seqadj), blind
            # to our output position, cannot carry client data segments
            # (fastin.py clamps at our output as we last told it).
            ack_b = conn.snd_max
            if trusted:
                tcpseg.set_window(buf, seg, conn.window_below(ack_b))
        tcpseg.set_ack(buf, seg, ack_b)
        # Our stack processes the ack only of a segment it finds acceptable: a
        # retransmission wholly below its receive point is discarded, ack and
        # all, so it must not count as shown (the self-ack is still owed).
        if trusted and (conn.rcv_ack is None or seq_ge(seg.end_seq, conn.rcv_ack)) \
                and (conn.stack_ack is None or seq_gt(ack_b, conn.stack_ack)):
            conn.stack_ack = ack_b
        if seg.sack_off >= 0:
            limit = conn.snd_max
            delta = conn.delta_seq

            def to_backup(left: int, right: int) -> Optional[tuple[int, int]]:
                lb, rb = seq_sub(left, delta), seq_sub(right, delta)
                if limit is not None:
                    if seq_ge(lb, limit):
                        return None
                    rb = seq_min(rb, limit)
                return (lb, rb)

            tcpseg.map_sack(buf, seg, to_backup)
        if seg.has_ts and seg.tsecr:
            if trusted and (conn.client_max_tsecr is None or seq_gt(seg.tsecr, conn.client_max_tsecr)):
                conn.client_max_tsecr = seg.tsecr
            margin = self.cfg.ts_margin if self.active else 0
            tsecr = seq_sub(seg.tsecr, (conn.delta_ts + margin) & MASK)
            if not conn.established_b and conn.tsval_b_syn is not None and conn.tsval_b_syn_last is not None:
                # Still in the handshake. Linux (6.x) drops an ACK whose TSecr
                # is not one of the TSvals its SYN-ACKs carried (TSEcrRejected).
                # Echoing a retransmitted SYN-ACK of the primary, the mapped
                # value is off by the few ms between the two stacks' retransmit
                # timers: keep it within ours.
                if seq_lt(tsecr, conn.tsval_b_syn):
                    tsecr = conn.tsval_b_syn
                elif seq_gt(tsecr, conn.tsval_b_syn_last):
                    tsecr = conn.tsval_b_syn_last
            tcpseg.set_tsecr(buf, seg, tsecr)
        if self.cfg.fast_inbound:
            self._note_for_kernel(conn, seg, trusted,
                                  trusted and seg.has_ts and tsecr_in != 0 and seg.payload_len > 0)
        return buf, out

    def _note_for_kernel(self, conn: BackupConn, seg: Segment, trusted: bool, as_kernel: bool) -> None:
        """Whether the kernel may map this connection's next segments
        (fastin.py): only after one it would have mapped the same way
        (trusted, with an echo to map, with data). A pure ack ends the entry
        until the client sends data again: the kernel leaves pure acks to us,
        and while the client only acks (a download) an entry would cost us
        a map write for every segment of ours (its room) and gain nothing."""
        conn.fast_ok = as_kernel
        if as_kernel and conn.fast_seen < self.cfg.fast_in_after:
            conn.fast_seen += 1
        if trusted and seg.payload_len:  # (clamped too: the position must not lag behind the stream)
            conn.fast_next = seg.end_seq if conn.fast_next is None else seq_max(conn.fast_next, seg.end_seq)
        self.fast_in_dirty.add(conn.key)

    def without_kernel_path(self) -> None:
        """The kernel's inbound path is gone (it could not start, or the
        takeover ended it): keep no more entries for it."""
        self.cfg.fast_inbound = False
        self.fast_in_dirty.clear()

    def _kernel_entry_moved(self, key: ConnKey) -> None:
        """The connection's kernel entry (fast_in_entry) may have changed or
        gone: the driver rewrites or deletes it."""
        if self.cfg.fast_inbound:
            self.fast_in_dirty.add(key)

    def fast_in_entry(self, key: ConnKey) -> Optional[InLimits]:
        """The kernel's entry for one connection, or None for none: only
        before takeover, for a connection mapped and past our handshake, with
        timestamps, no FIN seen, whose last segment we mapped as the kernel
        would have, and not before the cfg.fast_in_after-th such."""
        conn = self.conns.get(key)
        if conn is None or self.active or conn.delta_seq is None or not conn.established_b or not conn.uses_ts \
                or conn.closing_since is not None or conn.client_fin_end is not None or not conn.fast_ok \
                or conn.fast_next is None or conn.rcv_ack is None or conn.snd_max is None \
                or conn.client_ack_b is None or conn.pending_in:
            return None
        if conn.fast_seen < self.cfg.fast_in_after:
            return None
        # The window test of _acceptable, at our receive point as we know it now
        # (it only moves on: the kernel's copy is stricter, never looser).
        rcv_hi = seq_add(conn.rcv_ack, (conn.last_window << conn.wscale) + (1 << 20))
        # Acks from the client's latest on: up to our output as we know it
        # now (it only grows: a stale end clamps more, as we would have
        # then), unclamped; beyond it clamped; no further than _acceptable trusts.
        room = seq_diff(conn.snd_max, conn.client_ack_b)
        ahead = room + self.cfg.max_ack_ahead
        if ahead < 0:
            return None
        return InLimits(conn.fast_next, seq_add(conn.client_ack_b, conn.delta_seq), room, conn.delta_seq,
                        conn.delta_ts, rcv_hi, min(ahead, (1 << 31) - 1), conn.client_shift)

    def absorb_fast_in(self, key: ConnKey, st: InState) -> None:
        """What the kernel saw of segments it mapped: the client's newest
        TSval (our self-acks echo it; an older one fails our stack's PAWS),
        the highest TSval of the primary's it echoed (our floor after
        takeover), the client's latest ack with its window (the copies we
        hold up to it are freed; beyond our output, what we send next is
        dropped and acked into our stack), and the highest ack our stack
        was shown. The driver passes only state that changed since it last
        read it, only to the connection the entry was written for, and reads
        it before we map a segment of the connection ourselves: what it
        passes is later than what we mapped."""
        conn = self.conns.get(key)
        if conn is None or not st.valid or conn.delta_seq is None:
            return
        if not conn.client_tsval or seq_gt(st.tsval, conn.client_tsval):
            conn.client_tsval = st.tsval
        if conn.client_max_tsecr is None or seq_gt(st.tsecr, conn.client_max_tsecr):
            conn.client_max_tsecr = st.tsecr
        if conn.stack_ack is None or seq_gt(st.shown, conn.stack_ack):
            conn.stack_ack = st.shown
        ack_b = seq_sub(st.ack, conn.delta_seq)
        if conn.client_ack_b is None or seq_ge(ack_b, conn.client_ack_b):
            # (An equal ack: the kernel's segment is the later, see above.)
            conn.client_window = st.window
            if conn.client_ack_b is None or seq_gt(ack_b, conn.client_ack_b):
                conn.client_ack_b = ack_b
                self._prune_held(conn)
        if conn.snd_max is not None and conn.client_ack_b is not None \
                and (conn.stack_ack is None or seq_gt(seq_min(conn.client_ack_b, conn.snd_max), conn.stack_ack)):
            # The kernel clamped to our output as it was when the entry was
            # written; what we sent since, the client has too: ack it into
            # our stack (on_batch_end), as _map_inbound's clamp would have.
            self.self_ack_due.add(key)

    def _acceptable(self, conn: BackupConn, seg: Segment) -> bool:
        """Would a TCP receiver accept this segment (RFC 793 window test)?

        Only acceptable segments may move our state (client ack, window,
        timestamps): a forged segment out of the window is passed to our
        stack, which discards it as the primary's did, and changes nothing here.
        """
        if conn.rcv_ack is None or conn.snd_max is None:
            return False
        # The primary never offers the client more than our window (plus what
        # it offered before our first report): allow 1 MiB of slack.
        # Trap (the fast-path matrix's stall; README, the fault matrix): a
        # client offered a right edge below what it already sent sends its
        # pure acks with that edge as their sequence (tcp_acceptable_seq), far
        # below our receive point, and they fail this test and our stack's
        # alike. So the primary never moves the edge it shows back
        # (PrimaryCore._window_for).
        window = (conn.last_window << conn.wscale) + (1 << 20)
        if not (seq_ge(seg.end_seq, (conn.rcv_ack - 65536) & MASK) and seq_le(seg.seq, (conn.rcv_ack + window) & MASK)):
            return False
        if not seg.flags & ACK:
            return True
        # The ack, mapped: never beyond what the primary can have sent (our
        # output plus its lag bound), never far behind what the client acked.
        ack_b = seq_sub(seg.ack, conn.delta_seq or 0)
        if seq_gt(ack_b, (conn.snd_max + self.cfg.max_ack_ahead) & MASK):
            return False
        if conn.client_ack_b is not None and seq_lt(ack_b, (conn.client_ack_b - (1 << 30)) & MASK):
            return False
        return True

    # == outbound: the backup's own replies ===================================

    def on_outbound(self, data: bytes, now: float) -> list[Action]:
        try:
            seg = tcpseg.parse(data)
        except MalformedPacket as e:
            return [Drop("malformed"), Count("malformed_out"), Log("malformed_packet", "debug", {"why": str(e)})]
        if seg.src != self.cfg.vip or seg.sport not in self.cfg.ports:
            return [Accept(), Count("foreign_out")] if self.active else [Drop("foreign"), Count("foreign_out")]
        key = seg.server_key()
        conn = self.conns.get(key)
        if conn is None:
            if self.active:
                return [Accept()]  # a connection born after takeover needs no mapping
            return [Drop("backup stays silent"), Count("silenced_out")]
        out: list[Action] = []
        if seg.flags & RST and (conn.fully_closed() or (not seg.flags & ACK and conn.client_fin_end is not None)):
            # Our stack resetting a connection the client has closed: a bare
            # RST is "no such socket", drawn by a late duplicate, by one of our
            # self-acks or takeover prompts, or by the client's own reset of a
            # socket it already closed (our output lagged the primary's). The
            # client has nothing left to send: keep it.
            return [Drop("reset after the client closed"), Count("rst_after_close_dropped")]
        if seg.flags & FIN:
            conn.fin_end = seg.end_seq
        if seg.flags & SYN and seg.flags & ACK:
            out += self._on_own_synack(conn, seg)
        else:
            conn.established_b = True
        if self.active and conn.delta_seq is not None and not conn.protected:
            # Not migrated (diverged, or protection was dropped): our stack's
            # bytes for it may differ from what the client was sent. The
            # client gets a reset instead (see on_inbound), never these.
            return out + [Drop("unprotected connection after takeover"), Count("unprotected_out_dropped")]
        if seg.payload_len and conn.checker is not None and not self.active:
            conn.checker.feed(seg.seq, tcpseg.payload(data, seg))
            out += self._check_output(conn)
        if self._track_own(conn, seg, now) and not self.active:
            self.unconfirmed.add(key)
            conn.changed_at, conn.reconfirm_after = now, 0.0
            self.recent.add(key)
        if seg.flags & (FIN | RST) and conn.closing_since is None:
            conn.closing_since = now
            self._kernel_entry_moved(key)
        if seg.flags & RST and self.active:
            conn.reset = True  # (while following, the primary's stack speaks for the connection, not ours)
        if self._already_acked(conn, seg):
            # The client already has these bytes (from the primary): keep our
            # stack ack-clocked by its own output instead (DESIGN.md trap 9).
            # One self-ack per batch acks them all (on_batch_end).
            if conn.stack_ack is not None and seq_le(seg.end_seq, conn.stack_ack):
                # Our stack resends bytes we believed it had seen acked: that
                # ack never reached it (dropped by its PAWS or sequence check,
                # without a trace). Owe it again, or its RTO backs off forever
                # while we keep dropping what it resends.
                conn.stack_ack = seg.seq
            self.self_ack_due.add(key)
            return out + [Drop("already acked by the client")]
        if not self.active or conn.delta_seq is None:
            if self.active:
                return out + [Accept()]
            if seg.seq_len > 0 and not seg.flags & RST:
                self._hold(conn, seg, data)
            return out + [Drop("held")]
        return out + [Accept(self._map_outbound(conn, seg, data, now))]

    def _on_own_synack(self, conn: BackupConn, seg: Segment) -> list[Action]:
        if conn.isn_b is None or conn.isn_b != seg.seq:
            conn.isn_b = seg.seq
            conn.tsval_b_syn = conn.tsval_b_syn_last = seg.tsval
            conn.opts_b = _opts(seg)
            conn.snd_max = seq_add(seg.seq, 1)
            conn.rcv_ack = seg.ack  # before clones held for the mapping are judged
            conn.uses_ts = seg.has_ts
            return self._maybe_map(conn)
        # Our stack resends its SYN-ACK: our first confirmation may have been
        # lost, and the primary holds its own SYN-ACK until it has one.
        conn.tsval_b_syn_last = seg.tsval
        self.unconfirmed.add(conn.key)
        return []

    def _track_own(self, conn: BackupConn, seg: Segment, now: float) -> bool:
        """Record what our stack emitted; True when the primary should hear of it."""
        moved = False
        if conn.snd_max is None or seq_gt(seg.end_seq, conn.snd_max):
            conn.snd_max = seg.end_seq
            moved = True
            if conn.fast_ok:
                self._kernel_entry_moved(conn.key)  # (where the kernel clamps acks)
        if seg.flags & ACK and (conn.rcv_ack is None or seq_gt(seg.ack, conn.rcv_ack)):
            conn.rcv_ack = seg.ack
            moved = True
            if conn.fast_ok:
                self._kernel_entry_moved(conn.key)  # (the kernel's receive window test)
        if not seg.flags & SYN:  # a SYN's window is never scaled
            conn.last_window = seg.window
            edge = self.window_edge(conn)
            if edge is not None and (conn.reported_edge is None or seq_gt(edge, conn.reported_edge)):
                # A window that opens without the ack moving (the app read)
                # must reach the primary too, or its window clamp stays shut.
                moved = True
        if seg.has_ts:
            conn.last_tsval_b, conn.last_tsval_b_at = seg.tsval, now
            if seg.flags & ACK:
                conn.tsecr_b = seg.tsecr
        if seg.flags & ACK and seg.sack_blocks != conn.sack:
            conn.sack = seg.sack_blocks
            moved = True
        return moved

    @staticmethod
    def window_edge(conn: BackupConn) -> Optional[int]:
        """Right edge of our receive window (client space), once known."""
        if conn.opts_b is None or conn.rcv_ack is None or not conn.last_window:
            return None
        return seq_add(conn.rcv_ack, conn.last_window << conn.wscale)

    def _already_acked(self, conn: BackupConn, seg: Segment) -> bool:
        return (seg.seq_len > 0 and not seg.flags & (SYN | RST) and conn.client_ack_b is not None
                and seq_le(seg.end_seq, conn.client_ack_b))

    def _self_ack(self, conn: BackupConn) -> list[Action]:
        if conn.client_ack_b is None or conn.snd_max is None or conn.rcv_ack is None:
            return []
        ack = seq_min(conn.client_ack_b, conn.snd_max)
        if conn.stack_ack is not None and not seq_gt(ack, conn.stack_ack):
            # Our stack already has this ack (it resent something the client
            # acked): a self-ack now could reach a closed socket and draw an RST.
            return []
        conn.stack_ack = ack
        cip, cport, vip, vport = conn.key
        opts = tcpseg.ts_option(conn.client_tsval, conn.last_tsval_b) if conn.uses_ts else b""
        pkt = tcpseg.build_segment(cip, vip, cport, vport, conn.rcv_ack, ack, ACK, conn.window_below(ack), opts)
        return [Inject(pkt, "self-ack: client already has these bytes"), Count("self_acks")]

    def on_batch_end(self, now: float) -> list[Action]:
        """After a batch of packets: one confirmation message for every connection
        that moved, and one self-ack per connection that needs one."""
        out: list[Action] = []
        self.urgent = False
        if self.active:
            self.unconfirmed.clear()  # nobody to confirm to: we serve
        if self.unconfirmed:
            entries = []
            for key in self.unconfirmed:
                conn = self.conns.get(key)
                if conn is None or conn.rcv_ack is None:
                    continue
                pos = None
                if conn.delta_seq is not None and conn.snd_max is not None:
                    pos = seq_add(conn.snd_max, conn.delta_seq)
                edge = self.window_edge(conn)
                if edge is not None:
                    conn.reported_edge = edge
                entries.append(ConfirmEntry(key, conn.rcv_ack, pos, conn.sack[:MAX_SACK], edge, conn.tsecr_b))
            self.unconfirmed.clear()
            for i in range(0, len(entries), MAX_CONFIRMS):
                out.append(SendSync(Confirm(tuple(entries[i:i + MAX_CONFIRMS]))))
        if self.self_ack_due:
            for key in self.self_ack_due:
                conn = self.conns.get(key)
                if conn is not None:
                    out += self._self_ack(conn)
            self.self_ack_due.clear()
        return out

    def _hold(self, conn: BackupConn, seg: Segment, data: bytes) -> None:
        held = conn.held
        if held is _NOTHING_HELD:
            held = conn.held = OrderedDict()
        prev = held.get(seg.seq)
        if prev is not None:
            conn.held_bytes -= len(prev[1])
        held[seg.seq] = (seg.end_seq, bytes(data))  # type: ignore[index]
        conn.held_bytes += len(data)

    def _prune_held(self, conn: BackupConn) -> None:
        acked = conn.client_ack_b
        if acked is None:
            return
        held = conn.held
        while held:
            seq, (end, data) = next(iter(held.items()))
            if not seq_le(end, acked):
                return
            held.popitem(last=False)  # type: ignore[attr-defined]
            conn.held_bytes -= len(data)
        conn.held = _NOTHING_HELD

    def _current_tsval_b(self, conn: BackupConn, now: float) -> int:
        """Our stack's TSval now, extrapolated at 1 kHz from its latest one."""
        return (conn.last_tsval_b + int((now - conn.last_tsval_b_at) * 1000)) & MASK

    def _out_tsval(self, conn: BackupConn, tsval_b: int) -> int:
        v = (tsval_b + conn.delta_ts + self.cfg.ts_margin) & MASK
        # PAWS (DESIGN.md trap 6): never below what the client has seen.
        if conn.client_max_tsecr is not None and seq_lt(v, conn.client_max_tsecr):
            v = conn.client_max_tsecr
        if conn.last_tsval_out is not None and seq_lt(v, conn.last_tsval_out):
            v = conn.last_tsval_out
        conn.last_tsval_out = v
        return v

    @staticmethod
    def _ack_seq(conn: BackupConn, seq: int) -> int:
        """The sequence number for a segment that only carries our ack (our space).

        Our output can be behind what the primary sent (the client has it):
        a bare ack at our own snd_nxt lies below the client's receive point,
        and the client drops it unread (RFC 793 acceptability) with its ack
        and SACK blocks. If we also lack client bytes (a lost clone), we
        cannot regenerate that output, the client never learns of the hole,
        and both wait forever. A bare ack placed at the client's receive
        point is accepted."""
        if conn.client_ack_b is not None and seq_gt(conn.client_ack_b, seq):
            return conn.client_ack_b
        return seq

    def _map_outbound(self, conn: BackupConn, seg: Segment, data: bytes, now: float,
                      fresh_ts: bool = False) -> bytes:
        assert conn.delta_seq is not None
        buf = bytearray(data)
        lift = seg.is_pure_ack() and (conn.snd_max is None or not seq_lt(seg.seq, conn.snd_max))
        # A pure ack below our snd_nxt is a zero-window probe or a keepalive
        # (snd_una - 1): it must stay below the client's receive point, where
        # it draws an ack with the client's window. Lifted, it was absorbed
        # silently, and a client whose window update was lost at takeover
        # never opened its window again: the stack's probes backed off to
        # 30 s and more.
        tcpseg.set_seq(buf, seg, seq_add(self._ack_seq(conn, seg.seq) if lift else seg.seq, conn.delta_seq))
        if seg.has_ts:
            tsval_b = self._current_tsval_b(conn, now) if fresh_ts else seg.tsval
            tcpseg.set_tsval(buf, seg, self._out_tsval(conn, tsval_b))
        if fresh_ts and conn.rcv_ack is not None and seg.flags & ACK and seq_gt(conn.rcv_ack, seg.ack):
            tcpseg.set_ack(buf, seg, conn.rcv_ack)
        return bytes(buf)

    # == sync ================================================================

    def on_conn_isn(self, msg: ConnIsn, now: float) -> list[Action]:
        conn = self.conns.get(msg.key)
        if conn is None:
            if len(self.early_isn) < 65536:
                self.early_isn[msg.key] = (msg, now)
            return []
        if conn.delta_seq is not None:
            # Sent again: the primary has not seen our mapping (our confirm was lost).
            self.unconfirmed.add(conn.key)
        return self._set_primary_isn(conn, msg)

    def on_primary_generation(self, generation: int, now: float) -> list[Action]:
        """The primary dropped protection (it lost us for a while, and stopped
        cloning): connections from an older generation cannot be migrated."""
        if generation <= self.primary_generation:
            return []
        self.primary_generation = generation
        n = 0
        for conn in self.conns.values():
            if conn.generation < generation and conn.protected:
                conn.protected, conn.reason = False, UNPROTECTED_DROPPED
                n += 1
        return [Log("protection_dropped_by_primary", "warning", {"generation": generation, "connections": n}),
                Count("unprotected_by_primary", n)]

    def _set_primary_isn(self, conn: BackupConn, msg: ConnIsn) -> list[Action]:
        conn.generation, conn.digests = msg.generation, msg.digests
        conn.isn_p = msg.isn
        conn.tsval_p_syn = msg.tsval
        conn.opts_p = (msg.has_ts, msg.sack_ok, msg.wscale)
        return self._maybe_map(conn)

    def _maybe_map(self, conn: BackupConn) -> list[Action]:
        """Once both handshakes are known, fix the deltas and release held clones."""
        if conn.isn_p is None or conn.isn_b is None or conn.delta_seq is not None:
            return []
        out: list[Action] = []
        conn.delta_seq = seq_sub(conn.isn_p, conn.isn_b)
        if conn.digests:  # (the primary's digests of its output follow: check ours against them)
            conn.checker = OutputChecker(seq_add(conn.isn_b, 1))
        if conn.uses_ts and conn.tsval_p_syn is not None and conn.tsval_b_syn is not None:
            conn.delta_ts = seq_sub(conn.tsval_p_syn, conn.tsval_b_syn)
        if conn.opts_p != conn.opts_b:
            conn.protected, conn.reason = False, UNPROTECTED_OPTIONS
            out.append(Log("options_mismatch", "error",
                           {"conn": conn.key, "primary": conn.opts_p, "backup": conn.opts_b}))
            out.append(Count("options_mismatch"))
        elif conn.generation < self.primary_generation:
            conn.protected, conn.reason = False, UNPROTECTED_DROPPED
        elif conn.reason == UNPROTECTED_NO_ISN:
            conn.protected = False  # the ISN came too late: the clones held for it were dropped
        else:
            conn.protected, conn.reason = True, ""
        self.unconfirmed.add(conn.key)
        self.urgent = True
        pending, conn.pending_in = conn.pending_in, ()
        for data in pending:
            seg = tcpseg.parse(data)
            mapped, extra = self._map_inbound(conn, seg, data)
            out.append(Inject(mapped if mapped is not None else data, "clone released after ISN"))
            out += extra
        return out

    def on_unprotect(self, msg: Unprotect, now: float) -> list[Action]:
        """The primary stopped holding the client back for these connections:
        the client may have been shown acks for bytes we never got."""
        n = 0
        for key in msg.keys:
            conn = self.conns.get(key)
            if conn is not None and conn.protected:
                conn.protected, conn.reason = False, UNPROTECTED_BY_PRIMARY
                n += 1
        return [Count("unprotected_by_primary", n)] if n else []

    # == divergence ===========================================================

    def on_digest(self, msg: Digest, now: float) -> list[Action]:
        """The primary's digests of its output: compare ours (divergence.py)."""
        out: list[Action] = []
        for key, start, length, dig in msg.entries:
            conn = self.conns.get(key)
            if conn is None or conn.checker is None or conn.delta_seq is None or not conn.protected:
                continue
            conn.checker.expect(seq_sub(start, conn.delta_seq), length, dig)
            out += self._check_output(conn)
        return out

    def _check_output(self, conn: BackupConn) -> list[Action]:
        assert conn.checker is not None
        at = conn.checker.check()
        reason = None
        if at is not None:
            reason = UNPROTECTED_DIVERGED
        elif conn.checker.too_far_ahead():
            # (A primary that said digests follow, and sent none for
            # divergence.MAX_AHEAD of our output.)
            reason, at = UNPROTECTED_UNVERIFIABLE, conn.checker.base
        if reason is None:
            return []
        offset = seq_sub(at, seq_add(conn.isn_b or 0, 1))
        conn.protected, conn.reason, conn.checker = False, reason, None
        return [SendSync(Diverged(conn.key, offset)), Count("diverged"),
                Log("connection_diverged", "error", {"conn": conn.key, "offset": offset, "why": reason})]

    def _reset_unprotected(self, conn: BackupConn, now: float) -> list[Action]:
        """Reset a connection we could not migrate, at our best guess of the
        client's receive point, then ask the client where it really is.

        The guess (its latest ack we saw) misses when the primary sent more
        since: a reset below the window is dropped without a word, and a
        client waiting for an answer never speaks again. So an old-sequence
        ACK follows; every TCP answers one with an ACK of its receive point
        (RFC 793), and on_inbound resets that exactly."""
        assert conn.delta_seq is not None and conn.client_ack_b is not None
        guess = seq_add(conn.client_ack_b, conn.delta_seq)
        cip, cport, vip, vport = conn.key
        probe = tcpseg.build_segment(vip, cip, vport, cport, (guess - 1) & MASK, conn.rcv_ack or 0, ACK,
                                     0, b"")
        conn.reset_probes += 1
        conn.reset_probed_at = now
        return [Inject(self._reset(conn, guess), "reset of an unprotected connection at takeover"),
                Inject(probe, "where is the client? (its ACK gets the exact reset)"), Count("unprotected_reset")]

    def _reset(self, conn: BackupConn, seq: int) -> bytes:
        cip, cport, vip, vport = conn.key
        return tcpseg.build_segment(vip, cip, vport, cport, seq, 0, RST, 0, b"")

    # == the primary's daemon ==================================================

    def suspend(self, reason: str) -> list[Action]:
        """The primary's daemon is silent while its host lives: unless it comes
        back, its acks go unclamped (fail-open) and ours may lack bytes the
        client was told are safe. Nothing is migrated while suspended."""
        self.suspended = reason
        return [Log("protection_suspended", "warning", {"reason": reason, "connections": len(self.conns)})]

    def resume(self) -> list[Action]:
        """The same daemon is back (it had stalled): its clamping never stopped."""
        was, self.suspended = self.suspended, ""
        return [Log("protection_resumed", "info", {})] if was else []

    def primary_restarted(self) -> list[Action]:
        """A new life of the primary's daemon: while it was down its queue was
        bypassed, so no connection of the old life can be migrated safely."""
        self.suspended = ""
        n = 0
        for conn in self.conns.values():
            if conn.protected:
                conn.protected, conn.reason = False, UNPROTECTED_RESTARTED
                n += 1
        return [Log("primary_daemon_restarted", "warning", {"unprotected": n})] if n else []

    # == takeover ============================================================

    def activate(self, now: float) -> list[Action]:
        """Switch to rewrite-and-release; resend what the client lacks and prompt it."""
        return list(self.activate_lazily(now))

    def activate_lazily(self, now: float) -> Iterator[Action]:
        """activate, each action as soon as it is made, for the driver to
        carry out at once. The held output goes back in pieces of the
        client's MSS: some 2,900 for the 4 MB a backup on cubic held in a
        bulk download. Made all before the first was sent, they kept the
        client's first byte 13 ms after the declared failure (median of 5
        crashes); sent as made, 8 ms. The switch happens at once; the
        resends are made as they are drawn."""
        self.active = True
        return self._release_held(now)

    def _release_held(self, now: float) -> Iterator[Action]:
        migrated = unprotected = resent = idle = 0
        for conn in self.conns.values():
            if self.suspended and conn.protected:
                conn.protected, conn.reason = False, self.suspended
            if conn.delta_seq is None or not conn.protected:
                unprotected += 1
                if conn.delta_seq is not None and conn.client_ack_b is not None and conn.closing_since is None:
                    yield from self._reset_unprotected(conn, now)
                if conn.delta_seq is not None and conn.rcv_ack is not None and conn.closing_since is None:
                    # Our own socket too, at its receive point: alive, it would
                    # go on writing to a client that is no longer there.
                    cip, cport, vip, vport = conn.key
                    yield Inject(tcpseg.build_segment(cip, vip, cport, vport, conn.rcv_ack, 0, RST, 0, b""),
                                 "reset of our own socket of an unprotected connection")
                continue
            migrated += 1
            for _seq, (end, data) in list(conn.held.items()):
                if conn.client_ack_b is not None and seq_le(end, conn.client_ack_b):
                    continue
                seg = tcpseg.parse(data)
                mapped = self._map_outbound(conn, seg, data, now, fresh_ts=True)
                # Held whole as our stack's GSO packet (up to 64 KB): resent in
                # pieces the client's MSS takes (options count against it).
                # Pieces the client already has are left out.
                acked_p = None if conn.client_ack_b is None else seq_add(conn.client_ack_b, conn.delta_seq)
                for piece in tcpseg.split(mapped, conn.client_mss - (seg.doff - 20), acked_p):
                    yield Inject(piece, "held segment resent")
                    resent += 1
            conn.held = _NOTHING_HELD
            conn.held_bytes = 0
            if now - conn.changed_at <= RECONFIRM_S:
                yield from self._prompt_client(conn, now)
            else:
                # Idle: the client has nothing of its own waiting for our
                # ack (the primary's clamped acks went out long since). With
                # 10,000 idle connections, their prompts (3 packets each)
                # held every takeover up by 250 ms.
                idle += 1
        yield from self.probe_closed_windows(now)
        yield Log("takeover_released", "warning",
                  {"migrated": migrated, "unprotected": unprotected, "segments_resent": resent,
                   "idle_not_prompted": idle})

    def _prompt_client(self, conn: BackupConn, now: float) -> list[Action]:
        """ACKs carrying our receive point, so the client resends at once instead of
        waiting out its backed-off RTO (a new ack restarts its loss recovery).

        Plain duplicate acks do not make a Linux client with SACK retransmit
        (RACK needs SACKed data after the hole): they help only when our ack
        is new to the client. Bytes lost in flight at the crash are resent at
        the client's RTO, unless snooping caught them (on_snooped)."""
        if conn.rcv_ack is None or conn.snd_max is None or conn.delta_seq is None:
            return []
        pkt = self._ack_to_client(conn, seq_add(self._ack_seq(conn, conn.snd_max), conn.delta_seq), now)
        return [Inject(pkt, "takeover prompt")] * TAKEOVER_ACK_PROMPTS

    def _ack_to_client(self, conn: BackupConn, seq: int, now: float) -> bytes:
        """A bare ACK of ours to the client at ``seq`` (the primary's space),
        carrying our receive point and window and a current TSval."""
        assert conn.rcv_ack is not None
        cip, cport, vip, vport = conn.key
        opts = b""
        if conn.uses_ts:
            opts = tcpseg.ts_option(self._out_tsval(conn, self._current_tsval_b(conn, now)), conn.client_tsval)
        return tcpseg.build_segment(vip, cip, vport, cport, seq, conn.rcv_ack, ACK, conn.last_window, opts)

    def probe_closed_windows(self, now: float) -> list[Action]:
        """After takeover, a window probe to each migrated connection whose
        client last showed a zero window.

        The client's window update may have gone to the dead primary (its
        ARP entry for the VIP moves only with our gratuitous ARP), and a
        client that believes its window open never sends another one. Our
        stack's own probes, by then backed off by the hold, would come
        seconds later. A segment just below the client's receive point draws
        an ack with its window at once; the driver repeats this on the
        gratuitous-ARP schedule."""
        if not self.active:
            return []
        out: list[Action] = []
        for conn in self.conns.values():
            if conn.client_window or not conn.protected or conn.delta_seq is None or conn.client_ack_b is None \
                    or conn.rcv_ack is None or conn.closing_since is not None:
                continue
            probe = self._ack_to_client(conn, seq_add(conn.client_ack_b, conn.delta_seq - 1), now)
            out += [Inject(probe, "window probe after takeover"), Count("window_probes")]
        return out

    # == time ================================================================

    def on_tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for key in list(self.recent):
            conn = self.conns.get(key)
            age = RECONFIRM_S if conn is None else now - conn.changed_at
            if age >= RECONFIRM_S:
                self.recent.discard(key)
            elif not self.active and conn is not None and conn.reconfirm_after <= age:
                self.unconfirmed.add(key)
                conn.reconfirm_after = max(2 * age, RECONFIRM_FIRST_S)
        for key in list(self.unmapped):
            conn = self.conns.get(key)
            if conn is None or conn.delta_seq is not None or conn.reason == UNPROTECTED_NO_ISN:
                self.unmapped.discard(key)
            elif not self.active and now - conn.created > self.cfg.handshake_hold_s:
                self.unmapped.discard(key)
                conn.reason = UNPROTECTED_NO_ISN
                if conn.pending_in:
                    out.append(Count("pending_expired", len(conn.pending_in)))
                conn.pending_in = ()
                out.append(Log("connection_unprotected", "warning", {"conn": key, "reason": conn.reason}))
        if not self.active and now < self.next_sweep:
            return out
        self.next_sweep = now + SWEEP_S
        for key in list(self.conns):
            conn = self.conns[key]
            if self.active and not conn.protected and conn.closing_since is None and conn.reset_probes \
                    and conn.reset_probes < UNPROTECTED_RESET_TRIES and now - conn.reset_probed_at >= 1.0:
                out += self._reset_unprotected(conn, now)  # the reset or the client's answer was lost
            if conn.closing_since is not None and now - conn.closing_since > self.cfg.closed_linger_s \
                    and not (self.active and not conn.protected and conn.delta_seq is not None):
                # (One we could not migrate stays: forgotten, its late output
                # would go out unmapped; remembered, it is always dropped.)
                del self.conns[key]
                self._kernel_entry_moved(key)
        for key in [k for k, (_, t) in self.early_isn.items() if now - t > self.cfg.handshake_hold_s]:
            del self.early_isn[key]
        return out

    def status(self, limit: Optional[int] = None) -> list[dict[str, object]]:
        """Per connection, at most ``limit`` of them, the unprotected first."""
        out = [c.status() for c in first_unprotected(list(self.conns.values()), limit)]
        if self.suspended:
            out = [dict(st, protected=False, reason=self.suspended) for st in out]
        return out

    def summary(self) -> dict[str, int]:
        """What control.summarize counts, without a status per connection."""
        n = 0 if self.suspended else sum(1 for c in self.conns.values() if c.protected)
        closed = sum(1 for c in self.conns.values() if (self.suspended or not c.protected) and c.ended())
        return {"connections": len(self.conns), "protected": n, "unprotected": len(self.conns) - n - closed,
                "closed": closed, "held_bytes": sum(c.held_bytes for c in self.conns.values())}
