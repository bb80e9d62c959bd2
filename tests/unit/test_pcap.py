"""The client-capture checks: gaps and resume times around a crash."""

from nfq_sttcp.pcap import ClientView, TcpRecord, client_view
from nfq_sttcp.tcpseg import ACK, PSH, RST, SYN

C, S = "10.77.0.10", "10.77.0.100"


def srv(t: float, seq: int, ack: int, n: int = 0, flags: int = ACK) -> TcpRecord:
    return TcpRecord(t, S, 7000, C, 40000, seq, ack, flags, n)


def cli(t: float, seq: int, flags: int = ACK, n: int = 0) -> TcpRecord:
    return TcpRecord(t, C, 40000, S, 7000, seq, 1, flags, n)


def view(records: list[TcpRecord], crash: float) -> ClientView:
    return client_view(records, C, S, crash)[(40000, 7000)]


def test_gap_spans_the_crash_and_resume_counts_from_it() -> None:
    records = [cli(0.0, 100, SYN), srv(0.001, 500, 101, flags=SYN | ACK),
               srv(1.0, 501, 101, 10, ACK | PSH), srv(1.1, 511, 101, 10, ACK | PSH),
               # crash at 1.2; the next data at 1.45
               srv(1.45, 521, 101, 10, ACK | PSH), srv(1.5, 531, 101, 10, ACK | PSH)]
    v = view(records, 1.2)
    assert v.gap_ms == 350.0  # 1.1 -> 1.45
    assert v.resume_ms == 250.0  # 1.2 -> 1.45
    assert v.syns_sent == 1 and v.rsts_received == 0


def test_a_later_stall_counts_in_the_gap_but_not_in_the_resume() -> None:
    records = [srv(1.0, 1, 1, 10), srv(1.3, 11, 1, 10), srv(1.4, 21, 1, 10), srv(2.0, 31, 1, 10)]
    v = view(records, 1.2)
    assert v.gap_ms == 600.0
    assert v.resume_ms == 100.0


def test_upload_waits_for_a_new_ack_not_a_repeated_one() -> None:
    records = [srv(1.0, 1, 1000), srv(1.1, 1, 2000),
               srv(1.3, 1, 2000),  # a repeated ack after the crash: not progress
               srv(1.5, 1, 3000)]
    v = view(records, 1.2)
    assert v.gap_ms is None and v.resume_ms is None  # no data at all
    assert v.any_gap_ms == 400.0
    assert v.any_resume_ms == 300.0


def test_nothing_after_the_crash_leaves_no_figure() -> None:
    v = view([srv(1.0, 1, 1, 10), srv(1.1, 11, 1, 10, ACK | RST)], 1.2)
    assert v.gap_ms is None and v.resume_ms is None
    assert v.rsts_received == 1


def test_one_client_port_shared_by_two_server_ports_is_two_connections_not_a_reconnect() -> None:
    # The kernel reuses an ephemeral port for a second connection whose server
    # port differs; each keeps its own SYN count and its own gap.
    records = [cli(0.0, 100, SYN), TcpRecord(0.0, C, 40000, S, 7001, 900, 0, SYN, 0),
               srv(0.001, 500, 101, flags=SYN | ACK),
               TcpRecord(0.001, S, 7001, C, 40000, 700, 901, SYN | ACK, 0),
               srv(1.0, 501, 101, 10, ACK | PSH), srv(1.5, 511, 101, 10, ACK | PSH),
               TcpRecord(1.1, S, 7001, C, 40000, 701, 901, ACK | PSH, 10)]
    views = client_view(records, C, S, 1.2)
    assert set(views) == {(40000, 7000), (40000, 7001)}
    assert views[(40000, 7000)].syns_sent == 1 and views[(40000, 7001)].syns_sent == 1
    assert views[(40000, 7000)].gap_ms == 500.0
    assert views[(40000, 7001)].gap_ms is None  # nothing of it after the crash
