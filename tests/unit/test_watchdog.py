import pytest

from nfq_sttcp.actions import Count, Log, TakeOver
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
    w.on_tick(1.13)  # (the driver ticks at least every interval / 5)
    assert w.state == SUSPECT
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
    # the primary's patience (daemon_lost_ms) can outlast the detection time
    m = PeerMonitor(0.05, 3, 0.6)
    m.on_heartbeat(0, "following")
    assert m.on_tick(0.59) == (False, []) and m.state == PRESENT
    changed, acts = m.on_tick(0.61)
    assert changed and acts[0].event == "backup_lost"
    assert abs(PeerMonitor(0.05, 3, 0.01).lost_after - 0.15) < 1e-9  # never shorter than detection


def probe(w, t, answered=True):
    """The driver probes the primary's host every half interval; a live host answers at once."""
    w.on_probe_sent(t)
    if answered:
        w.on_probe_reply(t + 0.001)


def test_a_silent_daemon_on_a_live_host_is_orphaned_not_taken_over():
    from nfq_sttcp.watchdog import ORPHANED
    w = Watchdog(0.05, 3)
    w.on_heartbeat(1.0)
    w.on_tick(1.06)
    assert w.state == SUSPECT and w.probing()
    probe(w, 1.085)
    probe(w, 1.11)
    probe(w, 1.135)
    acts = w.on_tick(1.16)
    assert w.state == ORPHANED and not any(isinstance(a, TakeOver) for a in acts)
    probe(w, 1.2)
    assert w.on_tick(1.3) == [] and w.state == ORPHANED  # answered within K intervals
    w.on_heartbeat(1.31)  # the daemon is back
    assert w.state == FOLLOWING
    # with daemon_lost_ms, a live host's stalled daemon is waited for first
    w = Watchdog(0.05, 3, 0.6)
    w.on_heartbeat(1.0)
    for t in (1.06, 1.11, 1.16, 1.3, 1.5):
        probe(w, t - 0.01)
        assert not any(isinstance(a, TakeOver) for a in w.on_tick(t)) and w.state == SUSPECT
    w.on_heartbeat(1.55)  # it was load, not death: nothing was given up
    assert w.state == FOLLOWING
    for t in (1.61, 1.8, 2.0, 2.16):
        probe(w, t - 0.01)
        w.on_tick(t)
    assert w.state == ORPHANED
    # our own loop stalls 200 ms meanwhile (no probes sent, none read): still a live host
    w = Watchdog(0.05, 3, 0.6)
    w.on_heartbeat(1.0)
    w.on_tick(1.06)
    probe(w, 1.1)
    assert not any(isinstance(a, TakeOver) for a in w.on_tick(1.3)) and w.state == SUSPECT
    # a host that stops answering meanwhile is still taken over at the detection time
    w = Watchdog(0.05, 3, 0.6)
    w.on_heartbeat(1.0)
    w.on_tick(1.06)
    probe(w, 1.06)
    probe(w, 1.085, answered=False)
    probe(w, 1.11, answered=False)
    assert any(isinstance(a, TakeOver) for a in w.on_tick(1.17)) and w.state == TAKEOVER


def test_an_orphaned_backup_takes_over_when_the_host_stops_answering_too():
    from nfq_sttcp.watchdog import ORPHANED
    w = Watchdog(0.05, 3)
    w.on_heartbeat(1.0)
    w.on_tick(1.06)
    probe(w, 1.14)
    w.on_tick(1.16)
    assert w.state == ORPHANED
    probe(w, 1.16, answered=False)
    assert w.on_tick(1.28) == []
    acts = w.on_tick(1.32)
    assert w.state == TAKEOVER and any(isinstance(a, TakeOver) for a in acts)
    assert w.times.reason == "the primary's host stopped answering too"


def test_a_dead_host_is_taken_over_at_the_usual_deadline():
    w = Watchdog(0.05, 3)
    w.on_heartbeat(1.0)
    w.on_probe_reply(1.01)  # an old answer, from before the silence, does not count
    w.on_tick(1.06)
    probe(w, 1.06, answered=False)
    probe(w, 1.085, answered=False)
    acts = w.on_tick(1.151)
    assert w.state == TAKEOVER and any(isinstance(a, TakeOver) for a in acts)


def test_a_stepping_down_primary_is_taken_over_at_once():
    from nfq_sttcp.watchdog import STOPPING, SWITCHOVER
    w = Watchdog(0.05, 3)
    w.on_heartbeat(1.0)
    acts = w.on_heartbeat(1.01, STOPPING)
    assert w.state == TAKEOVER and any(isinstance(a, TakeOver) for a in acts) and w.times.reason == SWITCHOVER
    assert w.times.detection_ms == 0
    w = Watchdog(0.05, 3, autonomous=False)  # keepalived owns the VIP: its MASTER alone says take over
    w.on_heartbeat(1.0)
    assert w.on_heartbeat(1.01, STOPPING) == [] and w.state == FOLLOWING


def test_probe_echo_round_trip_against_scapy():
    from scapy.layers.inet import ICMP, IP
    from nfq_sttcp import probe
    req = probe.echo_request(0x1234, 7)
    pkt = ICMP(req)
    assert (pkt.type, pkt.id, pkt.seq) == (8, 0x1234, 7)
    from scapy.packet import Raw
    assert req == bytes(ICMP(type=8, id=0x1234, seq=7) / Raw(b"nfq-sttcp probe"))  # scapy computes the checksum
    reply = bytes(IP(src="10.77.0.1", dst="10.77.0.2") / ICMP(type=0, id=0x1234, seq=7))
    assert probe.parse_echo_reply(reply) == ("10.77.0.1", 0x1234, 7)
    assert probe.parse_echo_reply(bytes(IP(src="10.77.0.1", dst="10.77.0.2") / ICMP(type=8))) is None
    for bad in (b"", b"\x45" + b"\0" * 10, reply[:22]):
        assert probe.parse_echo_reply(bad) is None


def test_with_keepalived_silence_never_takes_over_but_a_live_host_still_orphans():
    from nfq_sttcp.watchdog import ORPHANED
    w = Watchdog(0.05, 3, autonomous=False)
    w.on_heartbeat(1.0)
    for t in (1.06, 1.2, 1.5, 3.0):  # a dead host (no answers): VRRP will say
        assert not any(isinstance(a, TakeOver) for a in w.on_tick(t))
    assert w.state == SUSPECT
    w = Watchdog(0.05, 3, autonomous=False)
    w.on_heartbeat(1.0)
    w.on_tick(1.06)
    probe(w, 1.1)
    w.on_tick(1.16)
    assert w.state == ORPHANED  # its daemon died, its host lives: protection is suspended
    assert not any(isinstance(a, TakeOver) for a in w.on_tick(5.0)) and w.state == ORPHANED
    acts = w.force_takeover(3.1, "keepalived: this host is MASTER")
    assert any(isinstance(a, TakeOver) for a in acts) and w.times.reason.startswith("keepalived")


def test_a_backup_whose_own_loop_stalled_past_the_deadline_probes_before_it_takes_over():
    """Our loop stalls (measured: 10 ms x 3 while 10,000 connections closed at
    once) and its first tick finds every beat missed. That silence may be our
    own: suspect first and let the host answer a probe, for one interval."""
    w = Watchdog(0.01, 3)
    w.on_heartbeat(1.0)
    acts = w.on_tick(1.05)  # 50 ms without a tick: 5 beats "missed"
    assert w.state == SUSPECT and not any(isinstance(a, TakeOver) for a in acts)
    w.on_probe_sent(1.05)
    w.on_probe_reply(1.0505)  # the host is alive: its daemon stalled too (or ours did)
    assert not any(isinstance(a, TakeOver) for a in w.on_tick(1.052))
    w.on_heartbeat(1.053)
    assert w.state == FOLLOWING
    # a host that really died: taken over one interval after the late suspicion
    acts = w.on_tick(1.12)
    assert w.state == SUSPECT
    w.on_probe_sent(1.12)
    assert not any(isinstance(a, TakeOver) for a in w.on_tick(1.125))
    acts = w.on_tick(1.131)
    assert w.state == TAKEOVER and any(isinstance(a, TakeOver) for a in acts)


def test_a_late_beat_is_counted_quietly_and_a_silence_of_the_whole_deadline_is_the_warning():
    def logs(acts):
        return [(a.event, a.level) for a in acts if isinstance(a, Log)]

    w = Watchdog(0.01, 3, orphan_after_s=1.0)
    w.on_heartbeat(1.0)
    acts = w.on_tick(1.012)  # one beat late: under load, common
    assert w.state == SUSPECT
    assert logs(acts) == [("watchdog_transition", "debug")] and Count("watchdog_suspicions") in acts
    assert logs(w.on_heartbeat(1.013)) == [("watchdog_transition", "debug")]
    assert w.state == FOLLOWING
    # silent for the whole deadline (the host answers our probes): one warning, not one a tick
    w.on_tick(1.025)
    w.on_probe_sent(1.025)
    w.on_probe_reply(1.026)
    acts = w.on_tick(1.044)
    assert logs(acts) == [("primary_silent", "warning")] and w.state == SUSPECT
    assert logs(w.on_tick(1.046)) == []
    assert logs(w.on_heartbeat(1.047)) == [("watchdog_transition", "info")]
    # the next late beat is quiet again
    assert logs(w.on_tick(1.059)) == [("watchdog_transition", "debug")]
