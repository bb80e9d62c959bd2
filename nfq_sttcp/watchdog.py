"""Failure detection as explicit state machines (pure: the clock is an argument).

Backup side::

    WAITING --beat--> FOLLOWING --missed 1--> SUSPECT --missed K--> TAKEOVER --done--> ACTIVE
                          ^------------beat-------'                     '--failed--> FAULT

The backup only ever takes over from a primary it has followed: a backup that
never heard a primary stays WAITING and never grabs the service address.
The primary runs a PeerMonitor on the backup: PRESENT or ABSENT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .actions import Action, Log, TakeOver

WAITING, FOLLOWING, SUSPECT, TAKEOVER, ACTIVE, FAULT = (
    "waiting", "following", "suspect", "takeover", "active", "fault")

TRANSITIONS: dict[str, frozenset[str]] = {
    WAITING: frozenset({FOLLOWING, TAKEOVER}),
    FOLLOWING: frozenset({SUSPECT, TAKEOVER}),
    SUSPECT: frozenset({FOLLOWING, TAKEOVER}),
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

    def __init__(self, interval_s: float, missed: int) -> None:
        self.interval = interval_s
        self.missed = missed
        self.state = WAITING
        self.last_beat: Optional[float] = None
        self.times = FailoverTimes()

    def _go(self, new: str, now: float, **why: object) -> list[Action]:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition("%s -> %s" % (self.state, new))
        old, self.state = self.state, new
        return [Log("watchdog_transition", "warning" if new in (SUSPECT, TAKEOVER, FAULT) else "info",
                    {"old": old, "new": new, **why})]

    def on_heartbeat(self, now: float) -> list[Action]:
        if self.state in (TAKEOVER, ACTIVE, FAULT):
            return []
        self.last_beat = now
        if self.state in (WAITING, SUSPECT):
            return self._go(FOLLOWING, now)
        return []

    def silence(self, now: float) -> float:
        return 0.0 if self.last_beat is None else now - self.last_beat

    def on_tick(self, now: float) -> list[Action]:
        if self.state not in (FOLLOWING, SUSPECT) or self.last_beat is None:
            return []
        missed = int(self.silence(now) / self.interval)
        if missed >= self.missed:
            self.times = FailoverTimes(last_beat=self.last_beat, declared=now)
            out = self._go(TAKEOVER, now, missed_beats=missed,
                           silence_ms=round(self.silence(now) * 1000, 1))
            return out + [TakeOver("primary missed %d heartbeats" % missed)]
        if missed >= 1 and self.state == FOLLOWING:
            return self._go(SUSPECT, now, missed_beats=missed)
        return []

    def force_takeover(self, now: float, reason: str) -> list[Action]:
        """Planned or operator-driven takeover: no detection wait."""
        if self.state not in (WAITING, FOLLOWING, SUSPECT):
            return []
        self.times = FailoverTimes(last_beat=self.last_beat or now, declared=now)
        return self._go(TAKEOVER, now, reason=reason) + [TakeOver(reason)]

    def takeover_done(self, now: float, ok: bool, **why: object) -> list[Action]:
        self.times.active = now
        return self._go(ACTIVE if ok else FAULT, now, **why)

    def next_deadline(self) -> Optional[float]:
        if self.state not in (FOLLOWING, SUSPECT) or self.last_beat is None:
            return None
        return self.last_beat + self.interval


PRESENT, ABSENT = "present", "absent"


class PeerMonitor:
    """The primary's view of the backup: is somebody following us?"""

    def __init__(self, interval_s: float, missed: int) -> None:
        self.interval = interval_s
        self.missed = missed
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
                and now - self.last_beat >= self.interval * self.missed:
            self.state = ABSENT
            return True, [Log("backup_lost", "warning",
                              {"old": PRESENT, "new": ABSENT,
                               "silence_ms": round((now - self.last_beat) * 1000, 1)})]
        return False, []
