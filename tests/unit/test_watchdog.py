import pytest

from nfq_sttcp.actions import Log, TakeOver
from nfq_sttcp.watchdog import (ABSENT, ACTIVE, FAULT, FOLLOWING, PRESENT, SUSPECT, TAKEOVER, TRANSITIONS, IllegalTransition, PeerMonitor, Watchdog)


def test_detection_after_k_missed_beats_and_timings():
    w = Watchdog(0.05, 3)
    assert w.on_tick(10.0) == []  # never heard a primary: never takes over
    w.on_heartbeat(1.0)
    assert w.state == FOLLOWING
    assert w.on_tick(1.04) == []
    acts = w.on_tick(1.06)
    assert w.state == SUSPECT and isinstance(acts[0], Log) and acts[0].fields == {"old": FOLLOWING, "new": SUSPECT, "missed_beats": 1}
    w.on_heartbeat(1.07)
    assert w.state == FOLLOWING
    assert not any(isinstance(a, TakeOver) for a in w.on_tick(1.2))
    acts = w.on_tick(1.221)
    assert w.state == TAKEOVER and any(isinstance(a, TakeOver) for a in acts)
    assert w.times.detection_ms == pytest.approx(151, abs=0.5)
    w.on_heartbeat(1.3)  # a late beat changes nothing once we took over
    assert w.state == TAKEOVER
    w.takeover_done(1.231, ok=True)
    assert w.state == ACTIVE and w.times.takeover_ms == pytest.approx(10, abs=0.5)


def test_transition_table_rejects_illegal_moves():
    w = Watchdog(0.05, 3)
    with pytest.raises(IllegalTransition):
        w._go(ACTIVE, 0)
    assert ACTIVE not in TRANSITIONS[FOLLOWING] and TRANSITIONS[FAULT] == frozenset()


def test_failed_takeover_is_fault_and_forced_takeover_skips_detection():
    w = Watchdog(0.05, 3)
    w.on_heartbeat(0)
    acts = w.force_takeover(0.01, "switchover")
    assert any(isinstance(a, TakeOver) for a in acts) and w.state == TAKEOVER
    w.takeover_done(0.02, ok=False)
    assert w.state == FAULT
    assert w.force_takeover(0.03, "again") == []


def test_peer_monitor():
    m = PeerMonitor(0.05, 3)
    assert m.on_heartbeat(0, "waiting") == (False, [])
    changed, _ = m.on_heartbeat(0.05, "following")
    assert changed and m.state == PRESENT
    assert m.on_tick(0.1) == (False, [])
    changed, acts = m.on_tick(0.21)
    assert changed and m.state == ABSENT and acts[0].event == "backup_lost"
    m.on_heartbeat(0.3, "following")
    changed, acts = m.on_heartbeat(0.35, "active")
    assert changed and m.state == ABSENT and acts[0].event == "backup_left"
