"""The fault matrix's verdict on a cell's connections (pure: no lab)."""

from nfq_sttcp.matrix import connection_failures
from nfq_sttcp.traffic import Result


def conn(**kw):
    c = {"kind": "download", "local_port": 40000, "ok": True, "error": None, "in_capture": True,
         "rsts_received": 0, "syns_sent": 1, "open_at_crash": True, "wire_gap_ms": 150.0}
    c.update(kw)
    return c


def test_a_clean_connection_open_at_the_crash_passes():
    assert connection_failures([conn(), conn(local_port=40001)], 2) == []


def test_each_way_to_fail_is_named():
    assert "2 RSTs" in connection_failures([conn(rsts_received=2)], 1)[0]
    assert "reconnected (2 SYNs)" in connection_failures([conn(syns_sent=2)], 1)[0]
    assert "boom" in connection_failures([conn(ok=False, error="boom")], 1)[0]
    assert "1 of 2 connections reported" in connection_failures([conn()], 2, "timeout")[0]


def test_a_connection_over_before_the_crash_fails_the_cell():
    f = connection_failures([conn(), conn(local_port=40001, open_at_crash=False)], 2)
    assert f == ["1 of 2 connections were not open at the crash (over before it, or no crash time)"]


def test_a_connection_missing_from_the_capture_is_not_taken_as_clean():
    f = connection_failures([conn(in_capture=False, rsts_received=None, syns_sent=None)], 1)
    assert len(f) == 1 and "not in the client's capture" in f[0]


def test_open_at_crash_is_whether_the_connection_ended_after_the_crash():
    r = Result("download", 7001)
    r.events = [(1.0, "p"), (2.5, "p")]
    r.ended = 2.6
    r.compute_gap(2.0)
    assert r.open_at_crash is True and r.gap_ms == 1500.0
    r.ended = 1.9
    r.compute_gap(2.0)
    assert r.open_at_crash is False
    assert "ended" not in r.summary() and r.summary()["open_at_crash"] is False
