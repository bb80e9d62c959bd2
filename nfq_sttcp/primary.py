"""The primary's packet logic: event in, actions out (no I/O).

It sees the primary's own client-bound segments (mangle POSTROUTING) and

* reports each new connection's ISN, TSval and options to the backup
  (from the SYN-ACK), holding the SYN-ACK until the backup has the SYN;
* applies the zero-loss rule: the ack field the client sees never passes
  what the backup has confirmed (``clamp_ack_to_backup``), and an ACK that
  was held back is re-emitted as soon as a confirmation covers it.

The primary fails open: without a following backup every segment passes
untouched and connections are reported unprotected.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from . import tcpseg
from .config import MAX_PACED_LAG
from .control import first_unprotected
from .divergence import OutputHasher
from .fastpath import FastState, Limits
from .actions import Accept, Action, Count, Defer, Drop, Inject, Log, Release, SendSync
from .seqmath import seq_ge, seq_gt, seq_le, seq_lt, seq_max, seq_min, seq_sub
from .syncproto import MAX_DIGESTS, MAX_UNPROTECT, Confirm, ConnIsn, Digest, DigestEntry, Diverged, Unprotect
from .tcpseg import ACK, FIN, RST, SYN, ConnKey, MalformedPacket, Segment

REASON_BEFORE_JOIN = "opened before the backup joined"
REASON_BACKUP_LOST = "backup lost"
REASON_NO_CONFIRM = "backup never confirmed the handshake and its mapping"
REASON_TOO_FAR_BEHIND = "backup stopped keeping up"
REASON_DIVERGED = "diverged: the backup's application wrote other bytes"
SWEEP_S = 1.0  # how often on_tick looks at every connection (see PrimaryCore.holding)
ISN_RESEND_S = 0.1  # how often the ISN goes again to a backup that has not mapped the connection
UNPROTECT_REPEAT_S = 3.0  # how long a connection given up on is repeated to the backup (each tick)
# A backup that lacks client bytes our stack has (their clone was lost) gets
# them only from the client's retransmission: after its RTO, which is 3 s
# when the handshake took a retransmitted SYN (RFC 6298 5.7; Linux's
# TCP_TIMEOUT_FALLBACK), as it does when the SYN's clone was lost too.
CLIENT_RTO_FALLBACK_S = 3.0
# The backup's pace (lag_limit) is its output over the latest window of at
# least this long; a connection's first window starts at its first position.
PACE_WINDOW_S = 0.02


@dataclass(slots=True)  # (see backup.BackupConn)
class PrimaryConn:
    key: ConnKey
    protected: bool
    reason: str = ""
    isn: int = 0
    confirmed: Optional[int] = None  # backup's ack field (client seq space)
    last_ack_sent: Optional[int] = None  # highest ack the client has been shown
    latest_ack: Optional[int] = None  # primary's own latest ack
    snd_nxt: int = 0
    window: int = 0
    tsval: int = 0
    tsecr: int = 0
    has_ts: bool = False
    held_synack: Optional[bytes] = None
    held_since: float = 0.0
    owed_ack: bool = False
    closing_since: Optional[float] = None
    fin_sent: bool = False  # our stack sent its FIN
    client_fin: bool = False  # the client's FIN went by (known only where we see inbound: PromotedCore)
    reset: bool = False  # our stack's reset went out unheld (an unprotected connection)
    last_seen: float = 0.0
    clamped: int = 0
    backup_pos: Optional[int] = None  # backup's output position (our space)
    relayed_sack: tuple = ()
    backup_edge: Optional[int] = None  # right edge of the backup's receive window (client space)
    backup_tsecr: Optional[int] = None  # the client TSval the backup's latest ack echoed
    shown_edge: Optional[int] = None  # right edge of the window the client has been shown
    own_edge: Optional[int] = None  # right edge of our stack's own receive window (its latest segment's)
    wscale: int = 0  # our window scale (from our SYN-ACK)
    deferred: "deque | tuple[()]" = ()  # (token, end_seq, data, since); a deque while any is deferred
    hasher: Optional[OutputHasher] = None  # our output, for the backup's divergence check
    isn_msg: Optional[ConnIsn] = None  # sent until the backup shows the mapping (a pos in its confirms)
    isn_sent_at: float = 0.0
    # The backup's pace (lag_limit): bytes a second over its latest window,
    # where that window started, when its position last moved, and the
    # furthest lag bound it has been given (the bound never moves back).
    backup_pace: float = 0.0
    pace_since: float = 0.0
    pace_from: Optional[int] = None
    backup_moved_at: float = 0.0
    lag_edge: Optional[int] = None

    def ended(self) -> bool:
        """Nothing left to protect: our stack reset it. (Both FINs gone by is
        not enough: ours may still wait for its ack with the reply before it,
        and a primary that sees no inbound never knows the client's FIN. Such
        a connection counts until swept, closed_linger_s after closing.)"""
        return self.reset

    def status(self) -> dict[str, object]:
        lag = None
        if self.latest_ack is not None and self.confirmed is not None:
            lag = max(0, (self.latest_ack - self.confirmed) & 0xFFFFFFFF)
        ahead = None
        if self.backup_pos is not None and seq_gt(self.snd_nxt, self.backup_pos):
            ahead = (self.snd_nxt - self.backup_pos) & 0xFFFFFFFF
        return {"conn": "%s:%d -> %s:%d" % self.key, "protected": self.protected,
                "reason": self.reason, "closed": self.ended(), "unconfirmed_bytes": lag, "acks_clamped": self.clamped,
                "backup_behind_bytes": ahead or 0, "deferred_segments": len(self.deferred),
                # (The lag bound's pace: PrimaryCore.lag_limit.)
                "backup_pace_mbit_s": round(self.backup_pace * 8e-6, 1),
                "holding_synack": self.held_synack is not None}


@dataclass
class PrimaryConfig:
    vip: str
    ports: frozenset[int]
    synack_hold_s: float = 4.5  # (config.py: synack_hold_ms)
    closed_linger_s: float = 30.0
    max_lag: int = 256 * 1024  # bytes our output may run ahead of the backup's; 0 = unbounded
    max_lag_s: float = 0.0  # or as much as the backup writes in this long, at its latest pace (lag_limit)
    lag_hold_s: float = 2.0
    idle_expiry_s: float = 4 * 3600.0  # forget a connection we have not sent on for this long
    fast_path: bool = False  # the kernel takes in-order data segments within our limits (fastpath.py)


@dataclass
class PrimaryCore:
    cfg: PrimaryConfig
    backup_following: bool = False
    conns: dict[ConnKey, PrimaryConn] = field(default_factory=dict)
    early_confirms: dict[ConnKey, tuple[int, float]] = field(default_factory=dict)
    next_token: int = 0
    generation: int = 0  # bumped whenever protection is dropped for every connection
    hashing: set[ConnKey] = field(default_factory=set)  # connections with output not yet digested
    # Connections we stopped protecting on our own, and until when we repeat
    # that to the backup (sync messages can be lost; it must never migrate them).
    unprotect_until: dict[ConnKey, float] = field(default_factory=dict)
    # What on_tick looks at each tick (see BackupCore.recent): connections
    # that hold a SYN-ACK or deferred output. Forgetting closed and idle
    # connections is swept once a second.
    holding: set[ConnKey] = field(default_factory=set)
    deferring: set[ConnKey] = field(default_factory=set)
    next_sweep: float = 0.0
    # Connections whose fast-path limits may have changed (fast_limits), for
    # the driver to bring its map up to date.
    fast_dirty: set[ConnKey] = field(default_factory=set)

    # -- packets -------------------------------------------------------------

    def on_outbound(self, data: bytes, now: float) -> list[Action]:
        """A client-bound segment from our own stack."""
        try:
            seg = tcpseg.parse(data)
        except MalformedPacket as e:
            # Fail open: the primary never blocks its own service.
            return [Accept(), Count("malformed_out"), Log("malformed_packet", "debug", {"why": str(e)})]
        if seg.src != self.cfg.vip or seg.sport not in self.cfg.ports:
            return [Accept(), Count("foreign_out")]
        key = seg.server_key()
        if seg.flags & SYN and seg.flags & ACK:
            return self._on_synack(seg, data, key, now)
        conn = self.conns.get(key)
        if conn is None:
            if seg.flags & RST:
                return [Accept()]  # our stack refusing a stranger: nothing to track
            conn = self.conns[key] = PrimaryConn(key, False, REASON_BEFORE_JOIN, last_seen=now)
            return [Accept(), Log("connection_unprotected", "warning",
                                  {"conn": key, "reason": conn.reason})]
        conn.last_seen = now
        self._fast_mark(key)
        if seg.flags & FIN:
            conn.fin_sent = True
        if seg.flags & (FIN | RST) and conn.closing_since is None:
            conn.closing_since = now
        if seg.flags & RST and not seg.flags & ACK and conn.fin_sent and conn.client_fin:
            # Both FINs went by and our socket is gone: a bare RST answers a
            # late duplicate (a FIN our stack resent while the client's final
            # ack sat in a busy queue draws a second one). The client is in
            # TIME-WAIT; the reset would only cut that short (RFC 1337).
            return [Drop("reset after both sides closed"), Count("rst_after_close_dropped")]
        if not conn.protected or not self.backup_following:
            if seg.flags & RST:
                conn.reset = True
            return [Accept()]
        if seg.flags & RST and not seg.flags & ACK and conn.fin_sent:
            # "No such socket" (a bare RST): our stack closed the connection
            # both ways, while the client, shown only the clamped ack, resends
            # its last segment (or that resend was still in flight when the
            # final ack went out). The reset is our clamping's doing: the
            # client gets the final ack when the backup confirms. An
            # application's abort (RST|ACK) still goes.
            return [Drop("reset of a socket closed under a clamped ack"), Count("rst_held_for_clamp")]
        if seg.payload_len and conn.hasher is not None:
            conn.hasher.feed(seg.seq, tcpseg.payload(data, seg))
            self.hashing.add(key)
        if seg.seq_len and self._must_wait_for_backup(conn, seg):
            self._remember(conn, seg)
            self.next_token += 1
            if not conn.deferred:
                conn.deferred = deque()
            conn.deferred.append((self.next_token, seg.end_seq, data, now))
            self.deferring.add(key)
            return [Defer(self.next_token), Count("deferred_out")]
        return self.clamp_ack_to_backup(conn, seg, data)

    def on_inbound_seen(self, seg: Segment) -> None:
        """A client segment of one of ours went by (where inbound is queued)."""
        conn = self.conns.get(seg.client_key())
        if conn is not None and seg.flags & FIN:
            conn.client_fin = True

    def _must_wait_for_backup(self, conn: PrimaryConn, seg: Segment) -> bool:
        """Bound how far our output runs ahead of the backup's, and so how much
        the backup must regenerate at takeover (the failover gap)."""
        if conn.deferred:
            return True  # keep the order
        limit = self.lag_limit(conn)
        return limit is not None and seq_gt(seg.end_seq, limit)

    def lag_limit(self, conn: PrimaryConn) -> Optional[int]:
        """Where our output must stop until the backup's moves on, or None
        (no bound, or no position from the backup yet).

        The bound is what a takeover costs: the backup must write again what
        the client already has before it sends anything new. max_lag alone
        bounds it in bytes, the same for a backup writing at 10 Mbit/s as at
        10 Gbit/s; with max_lag_s the bound is also as much as the backup
        wrote in that long at its latest pace (capped at MAX_PACED_LAG), so
        that a fast backup is not held to the byte bound. Measured on an
        unshaped download (fast path, 400 MB): a 256 KB bound left the
        primary idle most of the time, waiting for the next confirmation
        (the client had nothing in flight at the median), and the download
        ran at 0.32 of plain TCP; a bound of 16 MB ran at 0.57."""
        if not self.cfg.max_lag or conn.backup_pos is None:
            return None
        lag = self.cfg.max_lag
        if self.cfg.max_lag_s:
            lag = max(lag, min(MAX_PACED_LAG, round(conn.backup_pace * self.cfg.max_lag_s)))
        edge = (conn.backup_pos + lag) & 0xFFFFFFFF
        # A pace that drops never takes back what was let out: a segment
        # resent below the old edge, or one the fast path's entry already
        # allows (fastpath.py: limits only grow), stays allowed.
        if conn.lag_edge is not None and seq_gt(conn.lag_edge, edge):
            return conn.lag_edge
        return edge

    def _lag_hold(self, conn: PrimaryConn) -> float:
        """How long our next segment waits at the lag bound for a backup
        that does not move. Longer when the backup lacks client bytes: its
        application may be waiting for them (a download's request whose
        clone was lost; seen in CI at 5% loss on the sync link: the SYN's
        clone had been lost too, the client had not resent the request 2 s
        later, its RTO being 3 s, and the connection was given up)."""
        if conn.confirmed is not None and conn.latest_ack is not None and seq_gt(conn.latest_ack, conn.confirmed):
            return self.cfg.lag_hold_s + CLIENT_RTO_FALLBACK_S
        return self.cfg.lag_hold_s

    @staticmethod
    def _note_backup_pos(conn: PrimaryConn, pos: int, now: float) -> None:
        """The backup's position moved to ``pos`` (ahead of the old): its
        pace is its progress over the latest window of at least
        PACE_WINDOW_S. A window spans whatever pause fell in it: from the
        positions alone a paused application (the primary's paused too) and
        a backup that writes slowly look the same, and only the latter
        matters here. After a pause the bound it was given stands (lag_limit)."""
        if conn.pace_from is None:
            conn.pace_from, conn.pace_since = pos, now
        elif now - conn.pace_since >= PACE_WINDOW_S:
            conn.backup_pace = seq_sub(pos, conn.pace_from) / (now - conn.pace_since)
            conn.pace_from, conn.pace_since = pos, now
        conn.backup_moved_at = now

    def _on_synack(self, seg: Segment, data: bytes, key: ConnKey, now: float) -> list[Action]:
        conn = self.conns.get(key)
        out0: list[Action] = []
        if conn is None or conn.isn != seg.seq or conn.closing_since is not None:
            if conn is not None:
                out0 = self._release_all(conn)  # nothing of the old connection stays held
            conn = self.conns[key] = PrimaryConn(key, self.backup_following,
                                                 "" if self.backup_following else REASON_BEFORE_JOIN,
                                                 isn=seg.seq, last_seen=now, held_since=now)
            early = self.early_confirms.pop(key, None)
            if early is not None and early[0] == seg.ack:  # exactly this handshake, not an older one
                conn.confirmed = early[0]
        conn.snd_nxt = seg.end_seq
        conn.wscale = seg.wscale or 0
        self._remember(conn, seg)
        self._fast_mark(key)
        out: list[Action] = out0
        if not conn.protected:
            return out + [Accept(), Log("connection_unprotected", "warning", {"conn": key, "reason": conn.reason})]
        if conn.hasher is None and not self.cfg.fast_path:  # (fast bytes are never seen here: no digests)
            conn.hasher = OutputHasher((seg.seq + 1) & 0xFFFFFFFF)
        # Sent again with every retransmission of the SYN-ACK, and on ticks
        # until the backup has mapped the connection: the sync link may lose it.
        conn.isn_msg, conn.isn_sent_at = self._conn_isn(key, seg), now
        out.append(SendSync(conn.isn_msg))
        if self._handshake_confirmed(conn, seg.ack):
            conn.held_synack = None
            conn.last_ack_sent = seg.ack
            out.append(Accept())
        else:
            # The client must not complete a handshake the backup never saw,
            # nor one it cannot map (see _handshake_confirmed).
            conn.held_synack = data
            self.holding.add(key)
            out += [Drop("synack held until the backup has the SYN"), Count("synack_held")]
        return out

    @staticmethod
    def _handshake_confirmed(conn: PrimaryConn, ack: int) -> bool:
        """The backup has the client's SYN (its ack covers it) and has mapped
        the connection (its confirms carry an output position, which needs
        our ISN). Released on the first alone, our SYN-ACK let a connection
        whose ISN message was lost carry data that the backup held unmapped:
        crashed before our next resend, the backup could only reset it."""
        return conn.confirmed is not None and seq_ge(conn.confirmed, ack) and conn.backup_pos is not None

    def _conn_isn(self, key: ConnKey, seg: Segment) -> ConnIsn:
        return ConnIsn(key, seg.seq, seg.tsval, seg.has_ts, seg.mss or 0,
                       -1 if seg.wscale is None else seg.wscale, seg.sack_ok, self.generation,
                       digests=not self.cfg.fast_path)

    def _remember(self, conn: PrimaryConn, seg: Segment) -> None:
        if seg.flags & RST:
            return  # its window (0) and timestamps mean nothing for the acks we re-emit
        if seg.flags & ACK:
            conn.latest_ack = seg.ack if conn.latest_ack is None else seq_max(conn.latest_ack, seg.ack)
            edge = self._own_edge(conn, seg)
            conn.own_edge = edge if conn.own_edge is None else seq_max(conn.own_edge, edge)
        conn.snd_nxt = seq_max(conn.snd_nxt, seg.end_seq)
        conn.window = seg.window
        if seg.has_ts:
            conn.has_ts, conn.tsval, conn.tsecr = True, seg.tsval, seg.tsecr

    def clamp_ack_to_backup(self, conn: PrimaryConn, seg: Segment, data: bytes,
                            remember: bool = True) -> list[Action]:
        """Zero-loss rule: never show the client an ack the backup has not confirmed."""
        if remember:
            self._remember(conn, seg)
        if not seg.flags & ACK or seg.flags & RST:
            return [Accept()]
        own_edge = self._own_edge(conn, seg)  # (before the ack is clamped: its window is our stack's)
        if not remember and conn.own_edge is not None:
            own_edge = seq_max(own_edge, conn.own_edge)  # (a deferred segment's window is an old one)
        allowed = conn.confirmed if conn.confirmed is not None else conn.last_ack_sent
        if allowed is None:
            return [Accept()]
        if conn.last_ack_sent is not None:
            allowed = seq_max(allowed, conn.last_ack_sent)
        if not seq_gt(seg.ack, allowed):
            conn.last_ack_sent = seg.ack if conn.last_ack_sent is None else seq_max(conn.last_ack_sent, seg.ack)
            return self._clamp_window(conn, seg, data, None, own_edge)
        conn.owed_ack = True
        conn.clamped += 1
        if seg.is_pure_ack() and conn.last_ack_sent is not None and seq_le(allowed, conn.last_ack_sent):
            # It would only repeat an ack the client has (and could pass for a
            # duplicate ack); it is re-emitted when the backup confirms.
            return [Drop("pure ack held for the backup"), Count("ack_held")]
        buf = bytearray(data)
        tcpseg.set_ack(buf, seg, allowed)
        if seg.has_ts and conn.backup_tsecr is not None:
            # Echo what the backup echoed. Our own TSecr can predate a
            # retransmission that only the backup needed: acked with an older
            # echo, the client's Eifel check (RFC 3522) calls the retransmission
            # spurious and undoes its recovery, and the rest of the hole then
            # goes one segment per RTO.
            tcpseg.set_tsecr(buf, seg, conn.backup_tsecr)
        if seg.sack_off >= 0:
            # A SACK block above the clamped ack would tell the client that
            # bytes are safe which die with the primary: keep only D-SACKs.
            tcpseg.map_sack(buf, seg, lambda left, right: (left, right) if seq_le(right, allowed) else None)
        conn.last_ack_sent = allowed
        return self._clamp_window(conn, seg, data, buf, own_edge)

    def _clamp_window(self, conn: PrimaryConn, seg: Segment, data: bytes,
                      buf: Optional[bytearray], own_edge: int) -> list[Action]:
        """Never offer the client more window than the backup can take: a
        clone beyond the backup's window is dropped by its stack, and the
        client, trusting our larger window, would resend it only at its RTO."""
        if not seg.flags & SYN:
            window = self._window_for(conn, seg.ack, own_edge)
            if window != seg.window:
                buf = buf if buf is not None else bytearray(data)
                tcpseg.set_window(buf, seg, window)
        return [Accept(buf) if buf is not None else Accept()]  # (the driver's checksum pass copies it)

    # -- sync ---------------------------------------------------------------

    def on_confirm(self, msg: Confirm, now: float) -> list[Action]:
        out: list[Action] = []
        for key, ack, pos, sack, edge, tsecr in msg.acks:
            conn = self.conns.get(key)
            if conn is None:
                if len(self.early_confirms) < 65536:
                    self.early_confirms[key] = (ack, now)
                continue
            conn.confirmed = ack if conn.confirmed is None else seq_max(conn.confirmed, ack)
            self._fast_mark(key)
            if pos is not None:
                conn.lag_edge = self.lag_limit(conn)  # (before the pace moves: the bound never moves back)
                if conn.backup_pos is None or seq_gt(pos, conn.backup_pos):
                    self._note_backup_pos(conn, pos, now)
                conn.backup_pos = pos if conn.backup_pos is None else seq_max(conn.backup_pos, pos)
                conn.isn_msg = None  # mapped: no more resends
            if edge is not None:
                conn.backup_edge = edge if conn.backup_edge is None else seq_max(conn.backup_edge, edge)
            if tsecr is not None and (conn.backup_tsecr is None or seq_gt(tsecr, conn.backup_tsecr)):
                conn.backup_tsecr = tsecr
            out += self._release_deferred(conn, force=False)
            out += self._release(conn, conn.confirmed, now)
            out += self._relay_backup_sack(conn, sack)
        return out

    def on_batch_end(self, now: float) -> list[Action]:
        """Digests of what we wrote since the last batch, for the backup to
        compare with its own output (divergence.py)."""
        entries = []
        for key in self.hashing:
            conn = self.conns.get(key)
            if conn is None or conn.hasher is None or not conn.protected:
                continue
            r = conn.hasher.take()
            if r is not None:
                entries.append(DigestEntry(key, *r))
        self.hashing.clear()
        return [SendSync(Digest(tuple(entries[i:i + MAX_DIGESTS]))) for i in range(0, len(entries), MAX_DIGESTS)]

    def on_diverged(self, msg: Diverged, now: float) -> list[Action]:
        """The backup's application wrote other bytes: this connection cannot
        be migrated; stop holding the client back for it."""
        conn = self.conns.get(msg.key)
        if conn is None or not conn.protected:
            return []
        conn.protected, conn.reason = False, REASON_DIVERGED
        conn.hasher = None
        self._fast_mark(conn.key)
        return self._release_all(conn) + [Count("diverged"), Log("connection_diverged", "error", {
            "conn": msg.key, "offset": msg.offset, "note": "the application is not deterministic; "
            "this connection is unprotected and would be reset at a failover"})]

    def _relay_backup_sack(self, conn: PrimaryConn, sack: tuple) -> list[Action]:
        """The backup lost a clone: it holds client bytes beyond a hole. Show the
        client a duplicate ack carrying the backup's SACK blocks, so it resends
        the hole now (RACK) instead of at its RTO; the resent segment reaches
        the backup as a fresh clone."""
        if not sack or sack == conn.relayed_sack or conn.last_ack_sent is None or conn.latest_ack is None:
            conn.relayed_sack = sack
            return []
        conn.relayed_sack = sack
        if not seq_gt(conn.latest_ack, conn.last_ack_sent) or not conn.protected or conn.held_synack is not None:
            return []
        blocks = [(left, right) for left, right in sack if seq_gt(left, conn.last_ack_sent)][:3]
        if not blocks:
            return []
        opts = tcpseg.ts_option(conn.tsval, self._echo(conn)) if conn.has_ts else b""
        opts += tcpseg.sack_option(blocks)
        cip, cport, sip, sport = conn.key
        pkt = tcpseg.build_segment(sip, cip, sport, cport, conn.snd_nxt, conn.last_ack_sent, ACK,
                                   self._window_for(conn, conn.last_ack_sent, self._edge_now(conn)), opts)
        return [Inject(pkt, "backup's SACK relayed"), Count("sack_relayed")]

    def _release_deferred(self, conn: PrimaryConn, force: bool) -> list[Action]:
        out: list[Action] = []
        limit = None if force else self.lag_limit(conn)
        while conn.deferred:
            token, end, data, _since = conn.deferred[0]
            if limit is not None and seq_gt(end, limit):
                break
            conn.deferred.popleft()  # type: ignore[union-attr]
            if not conn.deferred:
                conn.deferred = ()
            if force or not conn.protected:
                out.append(Release(token))
                continue
            acts = self.clamp_ack_to_backup(conn, tcpseg.parse(data), data, remember=False)
            payload = acts[0].payload if isinstance(acts[0], Accept) else None
            out.append(Release(token, payload))
        return out

    def _release(self, conn: PrimaryConn, allowed: int, now: float) -> list[Action]:
        out: list[Action] = []
        if conn.held_synack is not None:
            seg = tcpseg.parse(conn.held_synack)
            if self._handshake_confirmed(conn, seg.ack):
                out.append(Inject(conn.held_synack, "synack confirmed by the backup"))
                conn.last_ack_sent = seg.ack
                conn.held_synack = None
            return out
        if not conn.owed_ack or conn.latest_ack is None or conn.last_ack_sent is None:
            return out
        new_ack = seq_min(conn.latest_ack, allowed)
        if seq_gt(new_ack, conn.last_ack_sent):
            out.append(Inject(self._pure_ack(conn, new_ack, self._echo(conn)), "ack released after confirmation"))
            conn.last_ack_sent = new_ack
        conn.owed_ack = seq_gt(conn.latest_ack, conn.last_ack_sent)
        return out

    @staticmethod
    def _own_edge(conn: PrimaryConn, seg: Segment) -> int:
        """The right edge of the window our stack offered in ``seg``."""
        shift = 0 if seg.flags & SYN else conn.wscale  # (a SYN-ACK's window is never scaled)
        return (seg.ack + (seg.window << shift)) & 0xFFFFFFFF

    def _edge_now(self, conn: PrimaryConn) -> int:
        """Our stack's latest right edge, for the acks we build ourselves."""
        if conn.own_edge is not None:
            return conn.own_edge
        return ((conn.latest_ack or 0) + (conn.window << conn.wscale)) & 0xFFFFFFFF

    def _window_for(self, conn: PrimaryConn, ack: int, own_edge: int) -> int:
        """The window to show beside ``ack`` (scaled by conn.wscale): our
        stack's right edge ``own_edge`` cut to the backup's, but never below
        the edge the client was already shown; records the edge shown (see
        _clamp_window).

        The window is reckoned from the edge, not carried over from our
        segment: beside an ack clamped to the backup's point, our stack's
        window (which starts at its own, later ack) would pull the edge back.
        A client whose data already lies beyond a shrunk edge acks with the
        edge as its sequence (Linux's tcp_acceptable_seq), below what the
        backup's stack has received: after a takeover that stack drops those
        acks whole, and the connection stalls for good. To keep the edge
        shown beside another ack the window may have to round up to the
        scale, past our stack's edge by less than one unit of it; so no later
        segment of ours may show its own edge as it is either (fast_limits'
        floor)."""
        edge = own_edge
        if conn.backup_edge is not None and self.backup_following:
            limit = conn.backup_edge
            if conn.shown_edge is not None and seq_gt(conn.shown_edge, limit):
                limit = conn.shown_edge
            if seq_gt(edge, limit):
                edge = limit
        if conn.shown_edge is not None and seq_lt(edge, conn.shown_edge):
            edge = conn.shown_edge
        room = (edge - ack) & 0xFFFFFFFF if seq_ge(edge, ack) else 0
        window = room >> conn.wscale
        if conn.shown_edge is not None and seq_lt((ack + (window << conn.wscale)) & 0xFFFFFFFF, conn.shown_edge):
            window += 1  # (rounded up, not down: the scale must not shrink it either)
        window = min(window, 0xFFFF)
        shown = (ack + (window << conn.wscale)) & 0xFFFFFFFF
        if conn.shown_edge is None or seq_gt(shown, conn.shown_edge):
            conn.shown_edge = shown
            if conn.own_edge is not None and seq_gt(shown, conn.own_edge):
                self._fast_mark(conn.key)  # (the kernel's floor moves with it)
        return window

    @staticmethod
    def _echo(conn: PrimaryConn) -> int:
        """TSecr for an ack at the backup's point (see clamp_ack_to_backup)."""
        return conn.backup_tsecr if conn.backup_tsecr is not None else conn.tsecr

    def _pure_ack(self, conn: PrimaryConn, ack: int, tsecr: int) -> bytes:
        cip, cport, sip, sport = conn.key
        opts = tcpseg.ts_option(conn.tsval, tsecr) if conn.has_ts else b""
        return tcpseg.build_segment(sip, cip, sport, cport, conn.snd_nxt, ack, ACK,
                                    self._window_for(conn, ack, self._edge_now(conn)), opts)

    # -- backup presence and time ----------------------------------------------

    def set_backup_following(self, following: bool, now: float) -> list[Action]:
        self.backup_following = following
        if following:
            return []
        # Our heartbeats carry the new generation: the backup learns that
        # every connection it had is no longer protected (it missed clones).
        self.generation += 1
        out: list[Action] = []
        for conn in self.conns.values():
            if conn.protected:
                conn.protected, conn.reason = False, REASON_BACKUP_LOST
                self._fast_mark(conn.key)
                out += self._release_all(conn)
        return out

    def _release_all(self, conn: PrimaryConn) -> list[Action]:
        """Fail open for one connection: show the client everything we hold back."""
        out: list[Action] = self._release_deferred(conn, force=True)
        if conn.held_synack is not None:
            out.append(Inject(conn.held_synack, "synack released unprotected"))
            conn.held_synack = None
        if conn.owed_ack and conn.latest_ack is not None:
            out.append(Inject(self._pure_ack(conn, conn.latest_ack, conn.tsecr), "ack released unprotected"))
            conn.last_ack_sent, conn.owed_ack = conn.latest_ack, False
        return out

    def on_tick(self, now: float) -> list[Action]:
        # (Repeats first: a connection given up on below is told once by _give_up.)
        out: list[Action] = self._repeat_unprotect(now)
        for key in list(self.holding):
            conn = self.conns.get(key)
            if conn is None or conn.held_synack is None:
                self.holding.discard(key)
            elif now - conn.held_since > self.cfg.synack_hold_s:
                out += self._give_up(conn, REASON_NO_CONFIRM, now)
            elif conn.backup_pos is None and conn.isn_msg is not None and now - conn.isn_sent_at >= ISN_RESEND_S:
                # Our ISN message may have been lost: the SYN-ACK waits for
                # the mapping, and our stack resends it (and the ISN with it)
                # only after a second.
                conn.isn_sent_at = now
                out += [SendSync(conn.isn_msg), Count("isn_resent")]
        for key in list(self.deferring):
            conn = self.conns.get(key)
            if conn is None or not conn.deferred:
                self.deferring.discard(key)
            elif now - max(conn.deferred[0][3], conn.backup_moved_at) > self._lag_hold(conn):
                # Our next segment waited lag_hold_s, and the backup did not
                # move meanwhile. (One that moves, however slowly, lets it out
                # in time; with a bound that followed a faster pace, only
                # after it has written that lead.)
                out += self._give_up(conn, REASON_TOO_FAR_BEHIND, now)
        if now < self.next_sweep:
            return out
        self.next_sweep = now + SWEEP_S
        for key in list(self.conns):
            conn = self.conns[key]
            if (conn.closing_since is not None and now - conn.closing_since > self.cfg.closed_linger_s) or \
                    (now - conn.last_seen > self.cfg.idle_expiry_s and not conn.deferred and conn.held_synack is None):
                del self.conns[key]
                self._fast_mark(conn.key)
        for key in [k for k, (_, t) in self.early_confirms.items() if now - t > self.cfg.synack_hold_s]:
            del self.early_confirms[key]
        return out

    def _give_up(self, conn: PrimaryConn, reason: str, now: float) -> list[Action]:
        """Stop protecting one connection. The backup hears it first (the
        Unprotect message goes out before anything we held back is released)."""
        conn.protected, conn.reason = False, reason
        self._fast_mark(conn.key)
        self.unprotect_until[conn.key] = now + UNPROTECT_REPEAT_S
        return ([SendSync(Unprotect((conn.key,)))] + self._release_all(conn)
                + [Log("connection_unprotected", "warning", {"conn": conn.key, "reason": reason})])

    def _repeat_unprotect(self, now: float) -> list[Action]:
        for key in [k for k, t in self.unprotect_until.items() if now > t]:
            del self.unprotect_until[key]
        keys = list(self.unprotect_until)
        return [SendSync(Unprotect(tuple(keys[i:i + MAX_UNPROTECT]))) for i in range(0, len(keys), MAX_UNPROTECT)]

    # -- the kernel fast path (fastpath.py) --------------------------------------

    def _fast_mark(self, key: ConnKey) -> None:
        """This connection's limits may have changed (fast_limits says how)."""
        if self.cfg.fast_path:
            self.fast_dirty.add(key)

    def fast_limits(self, key: ConnKey) -> Optional[Limits]:
        """What the kernel may let out of this connection without us, or None
        (then its entry goes, and every segment comes to us): exactly the
        segments on_outbound would accept unchanged. Limits follow the
        backup's confirmations; one not yet handed to the kernel is stricter."""
        conn = self.conns.get(key)
        if (conn is None or not self.cfg.fast_path or not conn.protected or not self.backup_following
                or conn.held_synack is not None or conn.deferred
                or conn.closing_since is not None or conn.fin_sent or conn.confirmed is None
                or conn.backup_pos is None or conn.last_ack_sent is None):
            # (Deferred: the next segment in order waits here; none may pass it.)
            return None
        allowed = seq_max(conn.confirmed, conn.last_ack_sent)
        seq_limit = self.lag_limit(conn)
        if seq_limit is None:
            seq_limit = conn.snd_nxt + (1 << 30)
        if conn.backup_edge is None:
            win_limit = allowed + (0xFFFF << conn.wscale)  # (_window_for leaves the window alone)
        elif conn.shown_edge is not None and seq_gt(conn.shown_edge, conn.backup_edge):
            win_limit = conn.shown_edge
        else:
            win_limit = conn.backup_edge
        return Limits(conn.snd_nxt, seq_limit, allowed, win_limit, conn.wscale, conn.shown_edge)

    def absorb_fast(self, key: ConnKey, st: FastState, now: float) -> None:
        """What the kernel sent of this connection without us (its last fast
        segment): our stack's position, ack, window and timestamps, as if we
        had seen it, so that an ack we build carries current ones (an older
        TSval would make the client drop it: PAWS)."""
        conn = self.conns.get(key)
        if conn is None or not st.packets:
            return
        frontier = seq_ge(st.next_fast, conn.snd_nxt)
        conn.snd_nxt = seq_max(conn.snd_nxt, st.next_fast)
        conn.latest_ack = st.last_ack if conn.latest_ack is None else seq_max(conn.latest_ack, st.last_ack)
        if conn.last_ack_sent is not None:
            conn.last_ack_sent = seq_max(conn.last_ack_sent, st.last_ack)
        if frontier:
            conn.window = st.window
            if conn.has_ts and seq_ge(st.tsval, conn.tsval):
                conn.tsval, conn.tsecr = st.tsval, st.tsecr
        edge = (st.last_ack + (st.window << conn.wscale)) & 0xFFFFFFFF
        conn.own_edge = edge if conn.own_edge is None else seq_max(conn.own_edge, edge)
        if conn.shown_edge is None or seq_gt(edge, conn.shown_edge):
            conn.shown_edge = edge
        if conn.last_ack_sent is not None:
            conn.owed_ack = seq_gt(conn.latest_ack, conn.last_ack_sent)
        conn.last_seen = now

    def release_everything(self) -> list[Action]:
        """On shutdown: the primary fails open, nothing stays held."""
        out: list[Action] = []
        for conn in self.conns.values():
            out += self._release_all(conn)
        return out

    def status(self, limit: Optional[int] = None) -> list[dict[str, object]]:
        """Per connection, at most ``limit`` of them, the unprotected first."""
        return [c.status() for c in first_unprotected(list(self.conns.values()), limit)]

    def summary(self) -> dict[str, int]:
        """What control.summarize counts, without a status per connection."""
        n = sum(1 for c in self.conns.values() if c.protected)
        closed = sum(1 for c in self.conns.values() if not c.protected and c.ended())
        return {"connections": len(self.conns), "protected": n, "unprotected": len(self.conns) - n - closed,
                "closed": closed, "held_bytes": 0}

