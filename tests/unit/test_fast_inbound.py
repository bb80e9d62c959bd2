"""The backup core's entries for the kernel's inbound path (fastin.py):
what it lets the kernel map, and what it reads back."""

from nfq_sttcp import fastin, tcpseg
from nfq_sttcp.fastin import InLimits, InState
from nfq_sttcp.tcpseg import ACK, FIN, PSH

from nfq_sttcp.backup import BackupConfig

from .helpers import KEY, VIP, from_client, from_server
from .test_cores import PORTS, mapped_backup

RCV_HI = (101 + (2000 << 7) + (1 << 20)) & 0xFFFFFFFF


def established(**cfg):
    """mapped_backup (delta_seq 4100, delta_ts 7000 - 50), our stack past
    the handshake (its first ack: 101, window 2000 << 7); an entry from the
    first data segment on, unless ``fast_in_after`` says otherwise."""
    b = mapped_backup(**dict(dict(fast_inbound=True, fast_in_after=1), **cfg))
    b.on_outbound(from_server(901, 101), 0)
    return b


AHEAD = 1 << 30  # BackupConfig.max_ack_ahead's default


def test_an_entry_names_the_acks_the_core_would_map_as_the_kernel_does():
    b = established()
    assert b.fast_in_entry(KEY) is None, "nothing mapped yet"
    b.fast_in_dirty.clear()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x" * 100, tsval=1100, tsecr=7010, window=1000), 0.1)
    assert KEY in b.fast_in_dirty
    # From the client's ack, 5001 (901 ours), on; our output ends there: no room unclamped.
    assert b.fast_in_entry(KEY) == InLimits(201, 5001, 0, 4100, 6950, RCV_HI, AHEAD, 7)
    # A resend below it moves nothing back; the next one moves the position on.
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x" * 50, tsval=1101, tsecr=7010, window=1000), 0.1)
    assert b.fast_in_entry(KEY).next_slow == 201
    b.on_inbound(from_client(201, 5001, ACK, b"y" * 10, tsval=1102, tsecr=7011, window=1000), 0.1)
    assert b.fast_in_entry(KEY).next_slow == 211
    # A pure ack (the kernel leaves those to us): no entry until the client sends data again.
    b.on_inbound(from_client(211, 5001, ACK, tsval=1103, tsecr=7011, window=900), 0.1)
    assert b.fast_in_entry(KEY) is None
    b.on_inbound(from_client(211, 5001, ACK | PSH, b"y", tsval=1103, tsecr=7011, window=900), 0.1)
    assert b.fast_in_entry(KEY) == InLimits(212, 5001, 0, 4100, 6950, RCV_HI, AHEAD, 7)
    # Our stack acks more and sends 300 bytes: the window test moves with
    # its ack, acks up to its output go unclamped.
    b.fast_in_dirty.clear()
    b.on_outbound(from_server(901, 212, payload=b"z" * 300), 0.2)
    assert KEY in b.fast_in_dirty
    assert b.fast_in_entry(KEY) == InLimits(212, 5001, 300, 4100, 6950, (RCV_HI + 111) & 0xFFFFFFFF, AHEAD + 300, 7)
    # The core maps a later ack: the lowest the kernel maps moves up.
    b.on_inbound(from_client(212, 5101, ACK | PSH, b"y", tsval=1104, tsecr=7012, window=900), 0.3)
    assert (b.fast_in_entry(KEY).ack, b.fast_in_entry(KEY).room) == (5101, 200)
    # One beyond our output, clamped: the room below the client's ack is negative.
    b.on_inbound(from_client(213, 5501, ACK | PSH, b"y", tsval=1105, tsecr=7013, window=900), 0.4)
    assert (b.fast_in_entry(KEY).ack, b.fast_in_entry(KEY).room) == (5501, -200)
    assert fastin.LIMITS.unpack(b.fast_in_entry(KEY).pack())[2] == (-200) & 0xFFFFFFFF


def test_a_connection_gets_its_entry_only_from_its_second_data_segment_on():
    """By default the kernel gets a connection only once the client has sent
    data twice: one request and a close (a new-connection storm) would cost
    the driver map writes and a delete, and the kernel would map nothing."""
    b = established(fast_in_after=2)
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is None, "one request: still ours"
    b.on_inbound(from_client(102, 5001, ACK, tsval=1101, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is None, "a pure ack does not count"
    b.on_inbound(from_client(102, 5001, ACK | PSH, b"y", tsval=1101, tsecr=0), 0.1)
    assert b.fast_in_entry(KEY) is None, "nor a segment the kernel would not have mapped (an echo of 0)"
    b.on_inbound(from_client(103, 5001, ACK | PSH, b"z", tsval=1102, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) == InLimits(104, 5001, 0, 4100, 6950, RCV_HI, AHEAD, 7)
    c = established(fast_in_after=2)
    c.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    c.on_inbound(from_client(102, 5001, ACK | FIN, tsval=1101, tsecr=7010), 0.1)
    assert c.fast_in_entry(KEY) is None
    assert BackupConfig(VIP, PORTS).fast_in_after == 2, "the daemon's default"


def test_no_entry_where_the_core_would_map_otherwise():
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x" * 100, tsval=1100, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is not None
    b.on_inbound(from_client(201, 5001, ACK | PSH, b"x", tsval=1101, tsecr=0), 0.1)
    assert b.fast_in_entry(KEY) is None, "an echo of 0, which the core leaves alone"
    b.on_inbound(from_client(202, 5001, ACK | PSH, b"x", tsval=1102, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is not None, "mapped as the kernel would again"
    b.on_inbound(from_client(5_000_000, 5001, ACK | PSH, b"x", tsval=1105, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is None, "out of the window: not trusted"
    b.on_inbound(from_client(203, 5001, ACK | PSH, b"x", tsval=1106, tsecr=7010), 0.1)
    assert b.fast_in_entry(KEY) is not None
    b.activate(1.0)
    assert b.fast_in_entry(KEY) is None, "after takeover the mapping changes (the PAWS margin)"
    c = established()
    c.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    c.on_inbound(from_client(102, 5001, ACK | FIN, tsval=1101, tsecr=7010), 0.1)
    assert c.fast_in_entry(KEY) is None, "a FIN seen"
    d = mapped_backup(fast_inbound=True, fast_in_after=1)  # our stack still in its handshake
    d.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=50), 0.1)
    assert d.fast_in_entry(KEY) is None
    e = mapped_backup()  # without fast_inbound nothing is kept for the kernel
    e.on_outbound(from_server(901, 101), 0)
    e.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    assert not e.fast_in_dirty
    f = established(max_ack_ahead=1000)
    f.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    assert f.fast_in_entry(KEY).ahead == 1000, "no further than the core trusts"


def test_what_the_kernel_saw_only_moves_the_timestamps_on():
    b = established()
    conn = b.conns[KEY]
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    b.absorb_fast_in(KEY, InState(500, 1200, 7050, True, 5001, 1000, 901, 3, 300))
    assert (conn.client_tsval, conn.client_max_tsecr) == (1200, 7050)
    b.absorb_fast_in(KEY, InState(500, 1150, 7020, True, 5001, 1000, 901, 4, 400))
    assert (conn.client_tsval, conn.client_max_tsecr) == (1200, 7050), "never backwards"
    b.absorb_fast_in(KEY, InState(500, 9999, 9999, False, 9999, 1, 0, 0, 0))
    assert conn.client_tsval == 1200, "nothing valid yet"
    # The self-ack a backup behind the client owes echoes the newest TSval.
    b.on_outbound(from_server(901, 102, payload=b"z" * 10), 0.2)  # (the client acked 5001 - 4100 = 901 only)
    b.on_inbound(from_client(102, 5011, ACK, tsval=1201, tsecr=7060), 0.3)
    b.absorb_fast_in(KEY, InState(500, 1300, 7070, True, 5001, 1000, 901, 5, 500))
    b.on_outbound(from_server(901, 102, payload=b"z" * 10), 0.4)  # resent: the client has it
    acks = [a for a in b.on_batch_end(0.5) if type(a).__name__ == "Inject"]
    assert acks and b"\x08\x0a" + (1300).to_bytes(4, "big") in acks[0].packet


def test_acks_the_kernel_mapped_free_the_copies_we_hold():
    b = established()
    conn = b.conns[KEY]
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010, window=1000), 0.1)
    for i in range(3):
        b.on_outbound(from_server(901 + 100 * i, 102, payload=b"z" * 100), 0.2)
    assert conn.held_bytes > 300 and b.fast_in_entry(KEY).room == 300
    # The kernel mapped the client's acks up to 5201 (1101 ours), the last with window 800.
    b.absorb_fast_in(KEY, InState(102, 1101, 7011, True, 5201, 800, 1101, 2, 0))
    assert (conn.client_ack_b, conn.stack_ack, conn.client_window) == (1101, 1101, 800)
    assert list(conn.held) == [1101], "what the client acked is freed"
    assert not b.self_ack_due, "our stack was shown it all"
    b.absorb_fast_in(KEY, InState(102, 1101, 7011, True, 5101, 700, 1001, 3, 0))
    assert (conn.client_ack_b, conn.stack_ack, conn.client_window) == (1101, 1101, 800), "older: nothing moves back"
    b.absorb_fast_in(KEY, InState(102, 1101, 7011, True, 5201, 600, 1101, 4, 0))
    assert conn.client_window == 600, "the same ack: a later window"


def test_an_ack_the_kernel_clamped_to_an_older_end_is_made_good_by_a_self_ack():
    b = established()
    conn = b.conns[KEY]
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010, window=1000), 0.1)
    b.on_outbound(from_server(901, 102, payload=b"z" * 100), 0.2)
    # The client acked all 100 bytes, but the kernel's entry still ended our output at 901.
    b.absorb_fast_in(KEY, InState(102, 1101, 7011, True, 5101, 800, 901, 1, 0))
    assert (conn.client_ack_b, conn.stack_ack) == (1001, 901) and not conn.held
    acks = [a for a in b.on_batch_end(0.3) if type(a).__name__ == "Inject"]
    assert len(acks) == 1 and tcpseg.parse(acks[0].packet).ack == 1001 and conn.stack_ack == 1001
