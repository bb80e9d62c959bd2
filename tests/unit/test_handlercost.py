"""The handler-cost harness drives the real daemons' callbacks: its figures
mean something only if every made-up packet took the path it stands for."""

import pytest

from nfq_sttcp import bench, handlercost

# Every counter a run may touch; anything else (a foreign, malformed,
# unmapped or out-of-window packet, a handler error) is a wrong path.
HANDSHAKE = {"synack_held", "verdict_drop", "injected", "verdict_inject", "sync_sent"}
AT_THE_LAG_BOUND = {"verdict_defer", "deferred_out", "verdict_release"}


def test_download_takes_the_download_path():
    n = 200
    r = handlercost.download(n)
    p, b = r["counters"]["primary"], r["counters"]["backup"]
    assert HANDSHAKE | {"verdict_accept"} <= set(p) <= HANDSHAKE | {"verdict_accept"} | AT_THE_LAG_BOUND
    assert set(b) == {"verdict_accept", "verdict_drop", "sync_sent"}  # (its confirmations)
    # Every data segment of the primary's got a verdict: let out at once,
    # or held at the lag bound and released once the backup confirmed.
    assert p["verdict_accept"] + p.get("verdict_defer", 0) == n
    assert p.get("verdict_release", 0) == p.get("verdict_defer", 0)
    assert p["verdict_drop"] == 1 and p["injected"] == 1  # the SYN-ACK, held for the backup, then let out
    # The backup dropped every copy of its own (and its SYN-ACK), and mapped
    # every client ack (and the SYN and the handshake's ack) into its stack.
    assert b["verdict_drop"] == n + 1
    assert b["verdict_accept"] == n // 2 + 2
    conn = r["connection"]
    assert conn["protected"]
    assert conn["checked_by_backup"] == n * handlercost.SEGMENT and conn["ranges_unchecked"] == 0
    assert conn["held_by_backup"] == 1  # the last segment: the client has not acked it
    assert r["packets"] == {"primary": n, "backup": n + n // 2}


def test_request_response_clamps_and_releases():
    n = 200
    r = handlercost.request_response(n)
    p, b = r["counters"]["primary"], r["counters"]["backup"]
    assert set(p) == HANDSHAKE | {"verdict_accept"}
    assert set(b) == {"verdict_accept", "verdict_drop", "sync_sent"}  # (its confirmations)
    assert p["verdict_accept"] == n
    assert r["connection"]["acks_clamped"] == n  # every answer went out at once, its ack clamped
    assert p["injected"] > 1  # the held SYN-ACK, then acks released as confirmations came in
    assert b["verdict_accept"] == 2 * n + 2  # requests and acks mapped, with the SYN and the handshake's ack
    assert b["verdict_drop"] == n + 1  # its own answers held, and its SYN-ACK
    conn = r["connection"]
    assert conn["protected"] and conn["held_by_backup"] == 0  # the client acked every answer
    assert conn["checked_by_backup"] == n and conn["ranges_unchecked"] == 0


def test_short_connections_each_go_from_syn_to_fin_protected():
    n = 100
    r = handlercost.connections(n)
    p, b = r["counters"]["primary"], r["counters"]["backup"]
    assert set(p) == HANDSHAKE | {"verdict_accept"}
    assert set(b) == {"verdict_accept", "verdict_drop", "sync_sent"}
    assert p["synack_held"] == p["verdict_drop"] == n  # each SYN-ACK held for the backup's mapping
    assert p["verdict_accept"] == 2 * n  # the echo and the FIN
    assert p["injected"] >= 2 * n  # each SYN-ACK let out, and an ack released on confirmation
    assert b["verdict_accept"] == 5 * n  # SYN, the handshake's ack, the request, the FIN, the last ack mapped
    assert b["verdict_drop"] == 3 * n  # its own SYN-ACK, echo and FIN
    assert r["connection"] == {"protected_by_primary": n, "held_by_primary": 0, "mapped_by_backup": n,
                               "closed_by_backup": n, "held_by_backup": 0}
    assert r["packets"] == {"primary": 3 * n, "backup": 8 * n}
    assert all(v > 0 for v in r["us_per_connection"].values())


def test_short_connections_refuse_more_than_the_client_ports():
    with pytest.raises(ValueError, match="one client port each"):
        handlercost.connections(40001)


def test_measure_reports_the_median_round_and_every_round_in_order():
    res = handlercost.measure(n=50, rounds=3)
    for name, unit in (("download", "us_per_packet"), ("request_response", "us_per_packet"),
                       ("connections", "us_per_connection")):
        for host in ("primary", "backup"):
            rounds = res[name]["rounds"][host]
            assert len(rounds) == 3
            assert res[name][unit][host] == sorted(rounds)[1]
    text = handlercost.line(res)
    assert "median of 3 rounds" in text and "download primary %.1f," % res["download"]["us_per_packet"]["primary"] in text
    lines = handlercost.rounds_lines(res)
    assert lines[1].startswith("  request-response, every round: primary %s" % " ".join(
        "%.1f" % v for v in res["request_response"]["rounds"]["primary"]))
    assert "per short connection (SYN to FIN, one echo byte) primary %.1f," % (
        res["connections"]["us_per_connection"]["primary"]) in text
    assert lines[2].startswith("  connections, every round: primary ")
    t = bench.table({"modes": {"plain": {}, "sttcp": {}}, "failover": {}, "handlers": res})
    assert text in t
    # A bench.json from before the connections workload still makes its line.
    old = {k: v for k, v in res.items() if k != "connections"}
    assert "short connection" not in handlercost.line(old) and len(handlercost.rounds_lines(old)) == 2
