"""The backup's kernel path for client segments (tuning.fast_inbound, fastin.py).

The program is checked in the kernel itself (BPF_PROG_TEST_RUN on made-up
frames, with real maps) against the backup core as the oracle: a frame it
maps must come out exactly as the core maps it. End to end in the lab:
uploads that take the path and survive a crash, and the daemon's cleanup."""

import os
import signal
import sys
import time

import pytest

from nfq_sttcp import bpf, fastin, lab, scenario, tcpseg
from nfq_sttcp.backup import BackupConfig, BackupCore
from nfq_sttcp.syncproto import ConnIsn
from nfq_sttcp.tcpseg import ACK, FIN, PSH

from .checks import MIXED, MIXED_BYTES, survived

MB = 1 << 20
CLIENT, VIP, CPORT, SPORT = "10.77.0.10", "10.77.0.100", 40000, 7000
KEY = (CLIENT, CPORT, VIP, SPORT)
MARK = 0x5717


@pytest.fixture
def kernel_program():
    fds = []
    try:
        lim = bpf.map_create(fastin.KEY.size, fastin.LIMITS.size, 1024, "t_in_lim")
        fds.append(lim)
        st = bpf.map_create(fastin.KEY.size, fastin.STATE.size, 1024, "t_in_state")
        fds.append(st)
        on = bpf.map_create(len(fastin.ON_KEY), 4, 1, "t_in_on")
        fds.append(on)
        bpf.map_update(on, fastin.ON_KEY, b"\1\0\0\0")
        prog = bpf.prog_load(fastin.program(lim, st, on, VIP, MARK), fastin.PROG_TYPE_SCHED_CLS, "t_fastin")
        fds.append(prog)
        yield lim, st, prog, on
    finally:
        for fd in fds:
            os.close(fd)


def _client(seq, ack, flags=ACK | PSH, payload=b"x" * 300, tsval=1100, tsecr=7010, window=1000, options=None,
            dst=VIP, checksum="partial", mac=b"\0" * 6):
    """A client segment as the backup's sync link carries it: an Ethernet
    frame whose TCP checksum holds only the pseudo-header sum, as a local
    stack leaves it and a veth carries it ("partial"), or the whole sum
    ("whole": a frame the kernel has not checked, in a test run). A test
    run's device is the loopback, whose address is all zeros: a frame to
    another ``mac`` is one for another host."""
    opts = tcpseg.ts_option(tsval, tsecr) if options is None else options
    pkt = bytearray(tcpseg.build_segment(CLIENT, dst, CPORT, SPORT, seq, ack, flags, window, opts, payload))
    if checksum == "partial":
        seg = tcpseg.parse(bytes(pkt))
        pkt[seg.csum_off:seg.csum_off + 2] = tcpseg._pseudo_sum(bytes(pkt), seg).to_bytes(2, "big")
    return mac + b"\x04" * 6 + b"\x08\x00" + bytes(pkt)


def _core():
    """The oracle: a backup core with the connection mapped (client ISN 100,
    ours 900, the primary's 5000; TSvals 50 and 7000) and our stack past
    its handshake; an entry from the first data segment on."""
    from tests.unit.helpers import client_syn, from_server, server_synack

    b = BackupCore(BackupConfig(VIP, frozenset({SPORT}), fast_inbound=True, fast_in_after=1))
    b.on_inbound(client_syn(100), 0)
    b.on_outbound(server_synack(900, 100, 50), 0)
    b.on_conn_isn(ConnIsn(KEY, 5000, 7000, True, 1460, 7, True), 0)
    b.on_outbound(from_server(901, 101), 0)
    return b


def _install(lim, st, core):
    entry = core.fast_in_entry(KEY)
    assert entry is not None
    kb = fastin.key_bytes(CLIENT, CPORT, SPORT)
    bpf.map_update(st, kb, fastin.InState.initial(entry.next_slow))
    bpf.map_update(lim, kb, entry.pack())
    return kb


def _without_checksum(frame):
    seg = tcpseg.parse(frame[14:])
    return frame[:14 + seg.csum_off] + frame[14 + seg.csum_off + 2:]


def _patched(field, old, new):
    """RFC 1624 (eqn. 3): a checksum field after one 32-bit word changed."""
    def fold(x):
        while x >> 16:
            x = (x & 0xFFFF) + (x >> 16)
        return x
    total = (~field & 0xFFFF) + (~(old >> 16) & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF)
    return ~fold(total) & 0xFFFF


def test_the_program_maps_a_segment_exactly_as_the_core_does(kernel_program):
    lim, st, prog, _on = kernel_program
    core = _core()
    core.on_inbound(_client(101, 5001)[14:], 0.1)  # the daemon maps the first one
    kb = _install(lim, st, core)
    frame = _client(401, 5001, payload=b"y" * 500, tsval=1101, tsecr=7011)
    verdict, out = bpf.prog_test_run_frame(prog, frame)
    assert verdict == fastin.TC_ACT_UNSPEC & 0xFFFFFFFF
    mapped = [a for a in core.on_inbound(frame[14:], 0.2) if type(a).__name__ == "Accept"][0].payload
    assert mapped is not None and _without_checksum(out) == _without_checksum(frame[:14] + bytes(mapped))
    seg = tcpseg.parse(out[14:])
    assert (seg.ack, seg.tsecr) == (901, 61), "ack - 4100, echo - 6950"
    # The checksum is patched for the two words, not summed afresh (in a test
    # run the kernel has not marked the frame partial, so the field moves).
    before = int.from_bytes(frame[14 + seg.csum_off:14 + seg.csum_off + 2], "big")
    after = int.from_bytes(out[14 + seg.csum_off:14 + seg.csum_off + 2], "big")
    assert after == _patched(_patched(before, 5001, 901), 7011, 61)
    got = fastin.InState.unpack(bpf.map_lookup(st, kb, fastin.STATE.size))
    assert got == fastin.InState(901, 1101, 7011, True, 5001, 1000, 901, 1, 500)
    verdict, out = bpf.prog_test_run_frame(prog, _client(901, 5001, ACK, b"z" * 100, tsval=1102, tsecr=7012))
    assert tcpseg.parse(out[14:]).ack == 901, "the next in order, no PSH"
    got = fastin.InState.unpack(bpf.map_lookup(st, kb, fastin.STATE.size))
    assert (got.next_fast, got.tsval, got.tsecr, got.packets, got.bytes) == (1001, 1102, 7012, 2, 600)
    bpf.prog_test_run_frame(prog, _client(1001, 5001, tsval=1000, tsecr=7000))
    got = fastin.InState.unpack(bpf.map_lookup(st, kb, fastin.STATE.size))
    assert (got.next_fast, got.tsval, got.tsecr) == (1301, 1102, 7012), "timestamps never move back"


def _same_as_the_core(prog, core, frame, now, out_frame=None):
    """The program maps ``frame`` and the core maps it the same way (the
    frame the program made goes into the list ``out_frame`` if given)."""
    verdict, out = bpf.prog_test_run_frame(prog, frame)
    assert verdict == fastin.TC_ACT_UNSPEC & 0xFFFFFFFF and out != frame, "mapped in the kernel"
    mapped = [a for a in core.on_inbound(frame[14:], now) if type(a).__name__ == "Accept"][0].payload
    assert mapped is not None and _without_checksum(out) == _without_checksum(frame[:14] + bytes(mapped))
    if out_frame is not None:
        out_frame.append(out)
    return tcpseg.parse(out[14:])


def test_the_program_maps_moving_acks_up_to_our_output_as_the_core_does(kernel_program):
    from tests.unit.helpers import from_server

    lim, st, prog, _on = kernel_program
    # ``core`` maps every frame too (the oracle); ``daemon`` sees only what
    # the daemon would: the first request and our reply.
    core, daemon = _core(), _core()
    for c in (core, daemon):
        c.on_inbound(_client(101, 5001)[14:], 0.1)
        c.on_outbound(from_server(901, 401, payload=b"r" * 1000), 0.1)  # our reply: our output ends at 1901
    kb = _install(lim, st, core)
    # A request whose ack moved (it acks the primary's reply), with a new window.
    seg = _same_as_the_core(prog, core, _client(401, 5501, payload=b"q" * 10, tsval=1101, tsecr=7011, window=900), 0.2)
    assert (seg.ack, seg.window, seg.tsecr) == (1401, 900, 61)
    # More requests, acking up to our output exactly.
    seg = _same_as_the_core(prog, core, _client(411, 5801, ACK, b"q", tsval=1102, tsecr=7012, window=800), 0.3)
    assert seg.ack == 1701
    seg = _same_as_the_core(prog, core, _client(412, 6001, ACK, b"q", tsval=1103, tsecr=7013, window=800), 0.4)
    assert seg.ack == 1901
    got = fastin.InState.unpack(bpf.map_lookup(st, kb, fastin.STATE.size))
    assert (got.next_fast, got.ack, got.window, got.packets, got.bytes) == (413, 6001, 800, 3, 12)
    # The same ack with a new window: the window read back is the later one.
    _same_as_the_core(prog, core, _client(413, 6001, ACK, b"q", tsval=1104, tsecr=7013, window=700), 0.5)
    assert fastin.InState.unpack(bpf.map_lookup(st, kb, fastin.STATE.size)).window == 700
    # Beyond our output (DESIGN.md trap 9): clamped to its end, the window
    # widened by what the ack lost (1,000 bytes at the client's scale, 2^7).
    frame, outs = _client(414, 7001, ACK, b"q", tsval=1105, tsecr=7014, window=700), []
    seg = _same_as_the_core(prog, core, frame, 0.6, outs)
    assert (seg.ack, seg.window) == (1901, 707)
    # The checksum is patched for the three words: the ack, the one with the window, the echo.

    def word(f, tcp_off):
        return int.from_bytes(f[34 + tcp_off:34 + tcp_off + 4], "big")

    assert [word(outs[0], off) - word(frame, off) for off in (8, 12, 28)] == [1901 - 7001, 7, 64 - 7014]
    field = int.from_bytes(frame[14 + seg.csum_off:14 + seg.csum_off + 2], "big")
    for off in (8, 12, 28):
        field = _patched(field, word(frame, off), word(outs[0], off))
    assert int.from_bytes(outs[0][14 + seg.csum_off:14 + seg.csum_off + 2], "big") == field
    seg = _same_as_the_core(prog, core, _client(415, 7001 + (1 << 24), ACK, b"x" * 20, tsval=1106, tsecr=7014,
                                                window=700), 0.7)
    assert (seg.ack, seg.window) == (1901, 0xFFFF), "at most 0xFFFF"
    got = fastin.InState.unpack(bpf.map_lookup(st, kb, fastin.STATE.size))
    assert (got.ack, got.window, got.shown) == (7001 + (1 << 24), 700, 1901)
    frame = _client(435, 7000, ACK, b"q", tsval=1107, tsecr=7014)
    assert bpf.prog_test_run_frame(prog, frame)[1] == frame, "an ack older than the kernel's latest"
    frame = _client(435, 7001 + (1 << 24), ACK, b"", tsval=1107, tsecr=7014)
    assert bpf.prog_test_run_frame(prog, frame)[1] == frame, "a pure ack (a download's): the daemon's"
    # Read back, the kernel's acks free what the daemon held up to them.
    conn = daemon.conns[KEY]
    assert conn.client_ack_b == 901 and conn.held and conn.stack_ack == 901
    daemon.absorb_fast_in(KEY, got)
    assert (conn.client_ack_b, conn.client_window, conn.stack_ack) == (2901 + (1 << 24), 700, 1901)
    assert not conn.held and not daemon.self_ack_due, "our stack was shown all it sent"


def test_the_program_leaves_everything_else_to_the_queue_unchanged(kernel_program):
    lim, st, prog, on = kernel_program
    core = _core()
    core.on_inbound(_client(101, 5001)[14:], 0.1)
    kb = _install(lim, st, core)

    def untouched(frame, why):
        verdict, out = bpf.prog_test_run_frame(prog, frame)
        assert verdict == fastin.TC_ACT_UNSPEC & 0xFFFFFFFF and out == frame, why

    untouched(_client(401, 5000), "an ack older than the client's latest")
    untouched(_client(402, 5001), "not next in order")
    untouched(_client(101, 5001), "a resend")
    untouched(_client(401, 5001, tsecr=0), "an echo of 0")
    untouched(_client(401, 5001, flags=ACK | FIN), "a FIN")
    untouched(_client(401, 5001, flags=ACK | PSH | 0x20), "URG")
    untouched(_client(401, 5001, payload=b""), "a pure ack")
    untouched(_client(401, 5001, options=tcpseg.ts_option(1100, 7010) + bytes([1, 1, 5, 10]) + bytes(8)),
              "SACK blocks")
    untouched(_client(401, 5001, options=b""), "no timestamps")
    untouched(_client(401, 5001, dst="10.77.0.101"), "not to the VIP")
    untouched(_client(401, 5001, mac=b"\x02" * 6), "a frame for another host")
    untouched(_client(401, 5001, checksum="whole"), "a frame the kernel has not checked: the daemon checks it")
    bpf.map_update(lim, kb, fastin.InLimits(401, 5001, 0, 4100, 6950, 400, 1 << 30, 7).pack())
    untouched(_client(401, 5001), "beyond our receive window")
    bpf.map_update(lim, kb, fastin.InLimits(401, 5001, 0, 4100, 6950, 1 << 30, 99, 7).pack())
    untouched(_client(401, 5101), "further than the core trusts")
    bpf.map_update(lim, kb, core.fast_in_entry(KEY).pack())
    frame = bytearray(_client(401, 5001))
    frame[12:14] = b"\x86\xdd"
    untouched(bytes(frame), "not IPv4")
    untouched(_client(401, 5001)[:60], "a runt")
    bpf.map_delete(lim, kb)
    untouched(_client(401, 5001), "no entry")
    assert fastin.InState.unpack(bpf.map_lookup(st, kb, fastin.STATE.size)).packets == 0
    bpf.map_update(lim, kb, core.fast_in_entry(KEY).pack())
    bpf.map_delete(on, fastin.ON_KEY)
    untouched(_client(401, 5001), "switched off (takeover)")
    bpf.map_update(on, fastin.ON_KEY, b"\1\0\0\0")
    assert bpf.prog_test_run_frame(prog, _client(401, 5001))[1] != _client(401, 5001), "and then it maps"


def _tc_filters(ns):
    return lab.sh("tc", "filter", "show", "dev", "sync0", "ingress", ns=ns, check=False).stdout


def test_an_upload_takes_the_kernel_path_and_survives_a_crash(make_lab):
    cfg = make_lab()
    assert cfg.fast_inbound
    assert "backup-in" in _tc_filters(lab.NS_BACKUP) and "direct-action" in _tc_filters(lab.NS_BACKUP)
    seen = {}
    r = scenario.run_with_crash(["upload:bytes=%d,crash_at=%d" % (200 * MB, 80 * MB)],
                                before_crash=lambda: seen.update(lab.control("backup")))
    survived(r, {"upload": 200 * MB})
    fi = seen["fast_inbound"]
    print("before the crash:", fi, "backup verdicts:", {k: v for k, v in seen["counters"].items() if "verdict" in k})
    # Its 80 MB came as ~1,300 clones of up to 64 KB: nearly all mapped in the kernel.
    assert fi["packets"] > 500 and seen["counters"].get("verdict_accept", 0) < fi["packets"], seen["counters"]
    assert not _tc_filters(lab.NS_BACKUP).strip(), "the program goes at takeover"


def test_requests_whose_acks_move_take_the_kernel_path_and_survive_a_crash(make_lab):
    """Echo requests ack the primary's answers: most arrive before our own
    answer is out, so the kernel clamps their ack to our output (and our
    daemon then drops our answer and acks it into our stack)."""
    make_lab()
    seen = {}
    r = scenario.run_with_crash(["echo:count=400,size=200,pause_ms=2,crash_msg=300,after=60"] * 2,
                                before_crash=lambda: seen.update(lab.control("backup")))
    survived(r)
    fi, counters = seen["fast_inbound"], seen["counters"]
    print("before the crash:", fi, {k: v for k, v in counters.items() if "verdict" in k or "self" in k})
    # 2 x 300 requests before the crash, and their handshakes: the daemon
    # mapped the first request of each and the handshake's ack.
    assert fi["packets"] >= 500 and counters.get("verdict_accept", 0) < 50, (fi, counters)


def test_mixed_workloads_with_the_kernel_path_survive_a_crash(make_lab):
    make_lab()
    seen = {}
    r = scenario.run_with_crash(MIXED,
                                before_crash=lambda: seen.update(lab.control("backup")))
    survived(r, MIXED_BYTES)
    assert seen["fast_inbound"]["packets"] > 0, seen["fast_inbound"]


def test_without_it_every_clone_goes_through_the_queue(make_lab):
    make_lab(fast_inbound=False)
    r = scenario.run_with_crash(["upload:bytes=%d,crash_at=%d" % (20 * MB, 5 * MB)], crash=False)
    c = r["connections"][0]
    assert c["ok"] and c["verified"] == 20 * MB and c["rsts_received"] == 0, c
    st = lab.control("backup")
    assert "fast_inbound" not in st and not _tc_filters(lab.NS_BACKUP).strip()


def test_the_daemon_detaches_its_program_when_it_stops(make_lab):
    make_lab()
    assert _tc_filters(lab.NS_BACKUP).strip()
    pinned = os.path.join(lab.STATE_DIR, "ctl", "bpf")
    lab.kill_daemon("backup", signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_tc_filters(lab.NS_BACKUP).strip() or os.path.exists(pinned)):
        time.sleep(0.1)
    assert not _tc_filters(lab.NS_BACKUP).strip()
    qdiscs = lab.sh("tc", "qdisc", "show", "dev", "sync0", ns=lab.NS_BACKUP).stdout
    assert "clsact" not in qdiscs, qdiscs
    assert not os.path.exists(pinned)


def test_cleanup_removes_a_killed_daemons_program_and_its_qdisc(make_lab):
    make_lab()
    marker = os.path.join(lab.STATE_DIR, "ctl", "clsact-sync0")
    lab.kill_daemon("backup")  # SIGKILL: filter, qdisc and file stay (a killed daemon removes nothing)
    assert _tc_filters(lab.NS_BACKUP).strip() and os.path.exists(marker)
    r = lab.sh(sys.executable, "-m", "nfq_sttcp", "cleanup", ns=lab.NS_BACKUP, check=False)
    assert r.returncode == 0, r.stderr
    assert not _tc_filters(lab.NS_BACKUP).strip()
    qdiscs = lab.sh("tc", "qdisc", "show", "dev", "sync0", ns=lab.NS_BACKUP).stdout
    assert "clsact" not in qdiscs, qdiscs
    assert not os.path.exists(marker)


def test_a_killed_daemons_program_is_replaced_when_it_starts_again(make_lab):
    """SIGKILL leaves the filter (and the clsact qdisc it added) behind; the
    next daemon finds the qdisc there (tc refuses a second one) and puts its
    own program in place of the dead one's, and an upload takes it."""
    make_lab()
    before = _tc_filters(lab.NS_BACKUP)
    lab.kill_daemon("backup")  # SIGKILL
    assert _tc_filters(lab.NS_BACKUP) == before, "nothing removed it"
    marker = os.path.join(lab.STATE_DIR, "ctl", "clsact-sync0")
    assert os.path.exists(marker), "the killed daemon added the qdisc, and said so"
    lab.start_backup_daemon(progress=lambda *_: None)
    after = _tc_filters(lab.NS_BACKUP)
    assert after.count("backup-in") == 1 and after != before, (before, after)  # (a new program id)
    r = scenario.run_with_crash(["upload:bytes=%d,crash_at=%d" % (100 * MB, 40 * MB)])
    survived(r, {"upload": 100 * MB})
    st = lab.control("backup")
    assert st["counters"].get("fast_in_packets", 0) > 0, st["counters"]
    # The qdisc the killed daemon added was this one's to remove (once it
    # stayed for good: nothing could tell it from someone else's). The
    # takeover detached the program, and the qdisc went with it.
    qdiscs = lab.sh("tc", "qdisc", "show", "dev", "sync0", ns=lab.NS_BACKUP).stdout
    assert "clsact" not in qdiscs, qdiscs
    assert not os.path.exists(marker)
