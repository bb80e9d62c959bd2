"""Failure detection as explicit state machines (pure: the clock is an argument).

Backup side::

    WAITING --beat--> FOLLOWING --missed 1--> SUSPECT --missed K--> TAKEOVER --done--> ACTIVE
                          ^------------beat-------'   |                 ^  '--failed--> FAULT
                          ^                           | missed K, host  |
                          '--------beat----------- ORPHANED --host silent K--'
                                                      (answers probes)

The backup only ever takes over from a primary it has followed: a backup that
never heard a primary stays WAITING and never grabs the service address.
While SUSPECT the driver probes the primary's host (ICMP echo on the LAN).
A host that answers while its daemon is silent is alive: its daemon died
(or stalls) and its service runs on, fail-open. Taking over would give the
VIP two owners, so the backup goes ORPHANED instead: protection is
suspended, and it takes over only if the host stops answering too.
The primary runs a PeerMonitor on the backup: PRESENT or ABSENT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .actions import Action, Count, Log, TakeOver

WAITING, FOLLOWING, SUSPECT, TAKEOVER, ACTIVE, FAULT = (
    "waiting", "following", "suspect", "takeover", "active", "fault")
ORPHANED = "orphaned"
SERVING, STOPPING = "serving", "stopping"  # the primary's states, as its heartbeats carry them
SWITCHOVER = "the primary stepped down (switchover)"

TRANSITIONS: dict[str, frozenset[str]] = {
    WAITING: frozenset({FOLLOWING, TAKEOVER}),
    FOLLOWING: frozenset({SUSPECT, TAKEOVER}),
    SUSPECT: frozenset({FOLLOWING, TAKEOVER, ORPHANED}),
    ORPHANED: frozenset({FOLLOWING, TAKEOVER}),
    TAKEOVER: frozenset({ACTIVE, FAULT}),
    ACTIVE: frozenset(),
    FAULT: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class FailoverTimes:
    last_beat: Optional[float] = None
    declared: Optional[float] = None
    active: Optional[float] = None
    reason: str = ""

    @property
    def detection_ms(self) -> Optional[float]:
        if self.last_beat is None or self.declared is None:
            return None
        return (self.declared - self.last_beat) * 1000.0

    @property
    def takeover_ms(self) -> Optional[float]:
        if self.declared is None or self.active is None:
            return None
        return (self.active - self.declared) * 1000.0


class Watchdog:
    """The backup's view of the primary."""

    def __init__(self, interval_s: float, missed: int, orphan_after_s: float = 0.0, autonomous: bool = True) -> None:
        self.interval = interval_s
        self.missed = missed
        # Not autonomous: another party (keepalived's VRRP) owns the VIP and
        # says when to take over (force_takeover); silence never does (a live
        # host's silent daemon still makes us orphaned).
        self.autonomous = autonomous
        self.orphan_after = max(orphan_after_s, interval_s * missed)
        self.state = WAITING
        self.last_beat: Optional[float] = None
        self.last_probe_reply: Optional[float] = None
        self.unanswered_since: Optional[float] = None  # our oldest probe with no reply after it
        self.suspect_since: Optional[float] = None
        # Did this suspicion reach the whole deadline (self.missed beats)?
        # One late beat is common under load: at 10 ms x 3, while 10,000
        # connections opened, the backup went suspect and back 1,241 times in
        # 50 s, each a warning. Now a late beat is a debug line and a count
        # (watchdog_suspicions); a silence of the whole deadline is the
        # warning (primary_silent), and its end is logged at info.
        self.silent = False
        self.times = FailoverTimes()

    def _go(self, new: str, now: float, **why: object) -> list[Action]:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition("%s -> %s" % (self.state, new))
        old, self.state = self.state, new
        if new in (TAKEOVER, FAULT, ORPHANED):
            level = "warning"
        elif new == SUSPECT or (old == SUSPECT and not self.silent):
            level = "debug"
        else:
            level = "info"
        if new != SUSPECT:
            self.silent = False
        return [Log("watchdog_transition", level, {"old": old, "new": new, **why})]

    def on_heartbeat(self, now: float, peer_state: str = SERVING) -> list[Action]:
        if self.state in (TAKEOVER, ACTIVE, FAULT):
            return []
        self.last_beat = now
        if peer_state == STOPPING and self.autonomous and self.state in (FOLLOWING, SUSPECT, ORPHANED):
            # A planned handover: the primary has fenced itself and given up
            # the VIP. Take over now, without the detection wait. (Not when
            # keepalived owns the VIP: only its MASTER says the VIP is here.
            # A primary steps down on a BACKUP notify even when keepalived
            # comes back to MASTER a moment later; taking over then left the
            # VIP on the fenced host and the service nowhere.)
            return self.force_takeover(now, SWITCHOVER)
        if self.state in (WAITING, SUSPECT, ORPHANED):
            return self._go(FOLLOWING, now)
        return []

    def on_probe_sent(self, now: float) -> None:
        if self.unanswered_since is None:
            self.unanswered_since = now

    def on_probe_reply(self, now: float) -> None:
        """The primary's host answered a probe."""
        self.last_probe_reply = now
        self.unanswered_since = None

    def probing(self) -> bool:
        """Should the driver probe the primary's host now?"""
        return self.state in (SUSPECT, ORPHANED)

    def _host_answers(self, now: float, grace: float) -> bool:
        """The host answered during this suspicion, and no probe of ours has
        gone unanswered for ``grace``. Dated from our own probes, not from the
        last reply: a stall of our own loop sends no probes and reads no
        replies, and must not pass for the host's silence (a takeover of a
        live primary would give the VIP two owners)."""
        return self.last_probe_reply is not None and (
            self.unanswered_since is None or now - self.unanswered_since < grace)

    def silence(self, now: float) -> float:
        return 0.0 if self.last_beat is None else now - self.last_beat

    def on_tick(self, now: float) -> list[Action]:
        if self.state == ORPHANED:
            if self._host_answers(now, self.interval * self.missed) or not self.autonomous:
                return []  # (with keepalived, VRRP decides when to take over)
            reason = "the primary's host stopped answering too"
            self.times = FailoverTimes(last_beat=self.last_probe_reply, declared=now, reason=reason)
            return self._go(TAKEOVER, now, reason=reason) + [TakeOver(reason)]
        if self.state not in (FOLLOWING, SUSPECT) or self.last_beat is None:
            return []
        missed = int(self.silence(now) / self.interval)
        if missed >= 1 and self.state == FOLLOWING:
            # Always by way of SUSPECT, even with every beat already missed:
            # when our own loop stalls past the whole deadline (measured: a
            # backup at 10 ms x 3 while 10,000 connections closed at once),
            # its first tick after the stall finds the silence long, and
            # took over a live primary before probing its host once.
            self.last_probe_reply = self.unanswered_since = None  # this suspicion's probes only
            self.suspect_since = now
            return self._go(SUSPECT, now, missed_beats=missed) + [Count("watchdog_suspicions")]
        out: list[Action] = []
        if missed >= self.missed and self.state == SUSPECT and not self.silent:
            self.silent = True
            out.append(Log("primary_silent", "warning", {"missed_beats": missed,
                                                         "silence_ms": round(self.silence(now) * 1000, 1)}))
        return out + self._suspect_tick(now, missed)

    def _suspect_tick(self, now: float, missed: int) -> list[Action]:
        if missed >= self.missed and self.state == SUSPECT and self._host_answers(now, 1.5 * self.interval):
            if self.silence(now) < self.orphan_after:
                return []  # a live host whose daemon stalls under load: wait (orphaning unprotects all)
            return self._go(ORPHANED, now, missed_beats=missed,
                            note="the primary's host answers but its daemon is silent: not taking over; "
                                 "protection lost until its daemon is back")
        if missed >= self.missed and self.state == SUSPECT:
            if self.suspect_since is not None and now - self.suspect_since < self.interval:
                return []  # suspicious for less than one interval: give the host's answer time to come
            if not self.autonomous:
                return []  # keepalived owns the VIP: silence alone never takes over (force_takeover does)
            self.times = FailoverTimes(last_beat=self.last_beat, declared=now,
                                       reason="primary missed %d heartbeats" % missed)
            out = self._go(TAKEOVER, now, missed_beats=missed,
                           silence_ms=round(self.silence(now) * 1000, 1))
            return out + [TakeOver("primary missed %d heartbeats" % missed)]
        return []

    def force_takeover(self, now: float, reason: str) -> list[Action]:
        """Planned or operator-driven takeover: no detection wait."""
        if self.state not in (WAITING, FOLLOWING, SUSPECT, ORPHANED):
            return []
        self.times = FailoverTimes(last_beat=self.last_beat or now, declared=now, reason=reason)
        return self._go(TAKEOVER, now, reason=reason) + [TakeOver(reason)]

    def takeover_done(self, now: float, ok: bool, **why: object) -> list[Action]:
        self.times.active = now
        return self._go(ACTIVE if ok else FAULT, now, **why)

    def next_deadline(self) -> Optional[float]:
        if self.state not in (FOLLOWING, SUSPECT, ORPHANED) or self.last_beat is None:
            return None
        return self.last_beat + self.interval


PRESENT, ABSENT = "present", "absent"


class PeerMonitor:
    """The primary's view of the backup: is somebody following us?"""

    def __init__(self, interval_s: float, missed: int, lost_after_s: float = 0.0) -> None:
        self.interval = interval_s
        self.missed = missed
        self.lost_after = max(lost_after_s, interval_s * missed)
        self.state = ABSENT
        self.last_beat: Optional[float] = None
        self.peer_state: Optional[str] = None

    def on_heartbeat(self, now: float, peer_state: str) -> tuple[bool, list[Action]]:
        """Return (changed, actions)."""
        self.last_beat = now
        self.peer_state = peer_state
        following = peer_state in (FOLLOWING, SUSPECT)
        if following and self.state == ABSENT:
            self.state = PRESENT
            return True, [Log("backup_joined", "info", {"old": ABSENT, "new": PRESENT})]
        if not following and self.state == PRESENT:
            self.state = ABSENT
            return True, [Log("backup_left", "warning",
                              {"old": PRESENT, "new": ABSENT, "peer_state": peer_state})]
        return False, []

    def on_tick(self, now: float) -> tuple[bool, list[Action]]:
        if self.state == PRESENT and self.last_beat is not None \
                and now - self.last_beat >= self.lost_after:
            self.state = ABSENT
            return True, [Log("backup_lost", "warning",
                              {"old": PRESENT, "new": ABSENT,
                               "silence_ms": round((now - self.last_beat) * 1000, 1)})]
        return False, []
