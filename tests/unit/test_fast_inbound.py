"""The backup core's entries for the kernel's inbound path (fastin.py):
what it lets the kernel map, and what it reads back."""

from nfq_sttcp.fastin import InLimits, InState
from nfq_sttcp.tcpseg import ACK, FIN, PSH

from .helpers import KEY, from_client, from_server
from .test_cores import mapped_backup

RCV_HI = (101 + (2000 << 7) + (1 << 20)) & 0xFFFFFFFF


def established(**cfg):
    """mapped_backup (delta_seq 4100, delta_ts 7000 - 50), our stack past
    the handshake (its first ack: 101, window 2000 << 7)."""
    b = mapped_backup(fast_inbound=True, **cfg)
    b.on_outbound(from_server(901, 101), 0)
    return b


def test_an_entry_names_the_ack_and_window_the_core_mapped_whole():
    b = established()
    assert b.fast_in_entry(KEY) is None, "nothing mapped yet"
    b.fast_in_dirty.clear()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x" * 100, tsval=1100, tsecr=7010, window=1000), 0.1)
    assert KEY in b.fast_in_dirty
    assert b.fast_in_entry(KEY) == InLimits(201, 5001, 901, 1000, 6950, RCV_HI)
    # A resend below it moves nothing back; the next one moves the position on.
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x" * 50, tsval=1101, tsecr=7010, window=1000), 0.1)
    assert b.fast_in_entry(KEY).next_slow == 201
    b.on_inbound(from_client(201, 5001, ACK, b"y" * 10, tsval=1102, tsecr=7011, window=1000), 0.1)
    assert b.fast_in_entry(KEY).next_slow == 211
    # A pure ack with a new window: the kernel then maps only that window.
    b.on_inbound(from_client(211, 5001, ACK, tsval=1103, tsecr=7011, window=900), 0.1)
    assert b.fast_in_entry(KEY) == InLimits(211, 5001, 901, 900, 6950, RCV_HI)
    # Our stack acks more: the window test moves with it.
    b.fast_in_dirty.clear()
    b.on_outbound(from_server(901, 211), 0.2)
    assert KEY in b.fast_in_dirty and b.fast_in_entry(KEY).rcv_hi == (RCV_HI + 110) & 0xFFFFFFFF


def test_no_entry_where_the_core_would_map_otherwise():
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x" * 100, tsval=1100, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is not None
    # An ack beyond our output (5101 - 4100 > 901) is clamped (DESIGN.md trap 9).
    b.on_inbound(from_client(201, 5101, ACK | PSH, b"x", tsval=1101, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is None
    b.on_inbound(from_client(202, 5001, ACK | PSH, b"x", tsval=1102, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is not None, "an ack mapped whole again"
    b.on_inbound(from_client(203, 5001, ACK | PSH, b"x", tsval=1103, tsecr=0), 0.1)
    assert b.fast_in_entry(KEY) is None, "an echo of 0, which the core leaves alone"
    b.on_inbound(from_client(204, 5001, ACK | PSH, b"x", tsval=1104, tsecr=7010), 0.1)
    b.on_inbound(from_client(5_000_000, 5001, ACK | PSH, b"x", tsval=1105, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is None, "out of the window: not trusted"
    b.on_inbound(from_client(205, 5001, ACK | PSH, b"x", tsval=1106, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is not None
    b.activate(1.0)
    assert b.fast_in_entry(KEY) is None, "after takeover the mapping changes (the PAWS margin)"
    c = established()
    c.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    c.on_inbound(from_client(102, 5001, ACK | FIN, tsval=1101, tsecr=7010), 0.1)
    assert c.fast_in_entry(KEY) is None, "a FIN seen"
    d = mapped_backup(fast_inbound=True)  # our stack still in its handshake
    d.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=50), 0.1)
    assert d.fast_in_entry(KEY) is None
    e = mapped_backup()  # without fast_inbound nothing is kept for the kernel
    e.on_outbound(from_server(901, 101), 0)
    e.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    assert not e.fast_in_dirty


def test_what_the_kernel_saw_only_moves_the_timestamps_on():
    b = established()
    conn = b.conns[KEY]
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    b.absorb_fast_in(KEY, InState(500, 1200, 7050, True, 3, 300))
    assert (conn.client_tsval, conn.client_max_tsecr) == (1200, 7050)
    b.absorb_fast_in(KEY, InState(500, 1150, 7020, True, 4, 400))
    assert (conn.client_tsval, conn.client_max_tsecr) == (1200, 7050), "never backwards"
    b.absorb_fast_in(KEY, InState(500, 9999, 9999, False, 0, 0))
    assert conn.client_tsval == 1200, "nothing valid yet"
    # The self-ack a backup behind the client owes echoes the newest TSval.
    b.on_outbound(from_server(901, 102, payload=b"z" * 10), 0.2)  # (the client acked 5001 - 4100 = 901 only)
    b.on_inbound(from_client(102, 5011, ACK, tsval=1201, tsecr=7060), 0.3)
    b.absorb_fast_in(KEY, InState(500, 1300, 7070, True, 5, 500))
    b.on_outbound(from_server(901, 102, payload=b"z" * 10), 0.4)  # resent: the client has it
    acks = [a for a in b.on_batch_end(0.5) if type(a).__name__ == "Inject"]
    assert acks and b"\x08\x0a" + (1300).to_bytes(4, "big") in acks[0].packet
