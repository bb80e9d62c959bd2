"""The handler-cost harness drives the real daemons' callbacks: its figures
mean something only if every made-up packet took the path it stands for."""

from nfq_sttcp import handlercost


def test_download_takes_the_download_path():
    n = 200
    r = handlercost.download(n)
    p, b = r["counters"]["primary"], r["counters"]["backup"]
    # Every data segment of the primary's got a verdict: let out at once,
    # or held at the lag bound and released once the backup confirmed.
    assert p["verdict_accept"] + p.get("verdict_defer", 0) == n
    assert p.get("verdict_release", 0) == p.get("verdict_defer", 0)
    # The backup dropped every copy of its own (and its SYN-ACK), and mapped
    # every client ack (and the SYN and the handshake's ack) into its stack.
    assert b["verdict_drop"] == n + 1
    assert b["verdict_accept"] == n // 2 + 2
    assert not p.get("handler_errors") and not b.get("handler_errors")
    assert r["packets"] == {"primary": n, "backup": n + n // 2}
    assert r["sync_messages"]["backup"] > 0 and r["sync_messages"]["primary"] > 0
    assert all(v > 0 for v in r["us_per_packet"].values())


def test_request_response_clamps_and_releases():
    n = 200
    r = handlercost.request_response(n)
    p, b = r["counters"]["primary"], r["counters"]["backup"]
    assert p["verdict_accept"] == n  # every answer went out at once, its ack clamped
    assert p["injected"] > 1  # the held SYN-ACK, then acks released as confirmations came in
    assert b["verdict_accept"] == 2 * n + 2  # requests and acks mapped, with the SYN and the handshake's ack
    assert b["verdict_drop"] == n + 1  # its own answers held, and its SYN-ACK
    assert not p.get("handler_errors") and not b.get("handler_errors")


def test_measure_reports_the_median_round():
    res = handlercost.measure(n=50, rounds=3)
    for name in ("download", "request_response"):
        for host in ("primary", "backup"):
            rounds = res[name]["rounds"][host]
            assert len(rounds) == 3 and rounds == sorted(rounds)
            assert res[name]["us_per_packet"][host] == rounds[1]
    text = handlercost.line(res)
    assert "median of 3 rounds" in text and "%.1f" % res["download"]["us_per_packet"]["primary"] in text
