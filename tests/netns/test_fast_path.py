"""The primary's kernel fast path (tuning.fast_path, fastpath.py).

The program's decisions are checked in the kernel itself (BPF_PROG_TEST_RUN
on made-up segments, with real maps); the path end to end in the lab: the
bpf match in front of the queue, segments that really took it, and crashes
that every connection survives."""

import os
import signal
import subprocess
import sys
import time

import pytest

from nfq_sttcp import bench, bpf, fastpath, lab, scenario, tcpseg
from nfq_sttcp.tcpseg import ACK, FIN, PSH, RST, SYN

from .checks import MIXED, MIXED_BYTES, intact, start_backup_with, survived

MB = 1 << 20
CLIENT, VIP, CPORT, SPORT = "10.77.0.10", "10.77.0.100", 40000, 7001


@pytest.fixture
def kernel_program():
    fds = []
    try:
        lim = bpf.map_create(fastpath.KEY.size, fastpath.LIMITS.size, 1024, "t_limits")
        fds.append(lim)
        st = bpf.map_create(fastpath.KEY.size, fastpath.STATE.size, 1024, "t_state")
        fds.append(st)
        prog = bpf.prog_load(fastpath.program(lim, st), fastpath.PROG_TYPE_SOCKET_FILTER, "t_fast")
        fds.append(prog)
        yield lim, st, prog
    finally:
        for fd in fds:
            os.close(fd)


def _seg(seq, ack, flags=ACK | PSH, payload=b"x" * 1000, window=500, options=None, sport=SPORT, ip_options=b""):
    opts = tcpseg.ts_option(111, 222) if options is None else options
    pkt = tcpseg.build_segment(VIP, CLIENT, sport, CPORT, seq, ack, flags, window, opts, payload)
    return _with_ip_options(pkt, ip_options)


def _with_ip_options(pkt, ip_options):
    """The packet with 4 bytes of IP options (IHL 6), or as it is."""
    if not ip_options:
        return pkt
    return bytes([0x46]) + pkt[1:2] + (len(pkt) + 4).to_bytes(2, "big") + pkt[4:20] + ip_options + pkt[20:]


def test_the_program_lets_out_exactly_what_the_daemon_would_accept_unchanged(kernel_program):
    lim, st, prog = kernel_program
    key = fastpath.key_bytes(CLIENT, CPORT, SPORT)

    def run(pkt):
        return bpf.prog_test_run(prog, pkt)

    assert run(_seg(1000, 5)) == 0, "a connection without an entry goes to the queue"
    # Lag bound: up to byte 5000; acks up to 5; windows up to 5 + 1000 << 7.
    bpf.map_update(st, key, fastpath.FastState.initial(1000))
    bpf.map_update(lim, key, fastpath.Limits(1000, 5000, 5, 5 + (1000 << 7), 7).pack())
    assert run(_seg(1000, 5)) == 1
    got = fastpath.FastState.unpack(bpf.map_lookup(st, key, fastpath.STATE.size))
    assert got == fastpath.FastState(2000, 5, 500, 111, 222, 1, 1000)
    assert run(_seg(2000, 4, flags=ACK)) == 1, "the next in order, an older ack, no PSH"
    assert run(_seg(3500, 5)) == 0, "a hole: not next in order"
    assert run(_seg(1000, 5)) == 0, "a resend of what went already"
    assert run(_seg(3000, 6)) == 0, "an ack the backup has not confirmed"
    for flags in (ACK | FIN, ACK | RST, SYN | ACK, ACK | 0x20, ACK | 0x40):
        assert run(_seg(3000, 5, flags=flags)) == 0, "flags %#x" % flags
    assert run(_seg(3000, 5, options=bytes([1, 1, 1, 1]))) == 0, "options other than the timestamps alone"
    sack = tcpseg.ts_option(111, 222) + bytes([1, 1, 5, 10]) + (10).to_bytes(4, "big") + (20).to_bytes(4, "big")
    assert run(_seg(3000, 5, options=sack)) == 0, "SACK blocks"
    assert run(_seg(3000, 5, payload=b"")) == 0, "a pure ack"
    assert run(_seg(3000, 5, window=1001)) == 0, "a window beyond the backup's edge"
    assert run(_seg(3000, 5, ip_options=b"\x01\x01\x01\x00")) == 0, "IP options"
    assert run(_seg(3000, 5, sport=7002)) == 0, "another connection"
    assert run(_seg(3000, 5, payload=b"x" * 2000)) == 1, "ends exactly at the lag bound"
    assert run(_seg(5000, 5, payload=b"y")) == 0, "one byte beyond it"
    assert run(b"\x45\x00") == 0, "a runt"
    # The daemon accepted a segment the program did not see (next_slow):
    bpf.map_update(lim, key, fastpath.Limits(7000, 9000, 5, 5 + (1000 << 7), 7).pack())
    assert run(_seg(5000, 5)) == 0, "the daemon's later position wins"
    assert run(_seg(7000, 5)) == 1, "next after the last the daemon accepted"
    assert run(_seg(8000, 5)) == 1, "then after the last fast one"
    got = fastpath.FastState.unpack(bpf.map_lookup(st, key, fastpath.STATE.size))
    assert (got.next_fast, got.packets, got.bytes) == (9000, 5, 6000)
    # A connection without timestamps: no options at all. The program keeps
    # no timestamps for it (its payload is where they would be).
    bpf.map_update(lim, key, fastpath.Limits(7000, 12000, 5, 5 + (1000 << 7), 7).pack())
    assert run(_seg(9000, 5, options=b"")) == 1
    got = fastpath.FastState.unpack(bpf.map_lookup(st, key, fastpath.STATE.size))
    assert (got.next_fast, got.tsval, got.tsecr, got.bytes) == (10000, 111, 222, 7000)
    assert run(_seg(10000, 5, options=b"", payload=b"x" * 8)) == 0, "too short to read 52 bytes: to the queue"
    # Nor may a fast window's edge fall below the one the client was shown.
    bpf.map_update(lim, key, fastpath.Limits(7000, 12000, 5, 5 + (1000 << 7), 7, 5 + (400 << 7)).pack())
    assert run(_seg(10000, 5, window=399)) == 0, "an edge below the floor"
    assert run(_seg(10000, 5, window=400)) == 1, "an edge at it"


def test_the_program_compares_across_the_sequence_wrap(kernel_program):
    lim, st, prog = kernel_program
    key = fastpath.key_bytes(CLIENT, CPORT, SPORT)
    start = 0xFFFFFF00
    bpf.map_update(st, key, fastpath.FastState.initial(start))
    bpf.map_update(lim, key, fastpath.Limits(start, (start + 2000) & 0xFFFFFFFF, 0xFFFFFFF0,
                                             (0xFFFFFFF0 + 4000) & 0xFFFFFFFF, 0).pack())
    assert bpf.prog_test_run(prog, _seg(start, 0xFFFFFFF0, window=4000)) == 1
    assert bpf.prog_test_run(prog, _seg((start + 1000) & 0xFFFFFFFF, 0xFFFFFFF0, window=4000)) == 1
    assert bpf.prog_test_run(prog, _seg((start + 2000) & 0xFFFFFFFF, 0xFFFFFFF0, window=4000)) == 0
    assert fastpath.FastState.unpack(bpf.map_lookup(st, key, fastpath.STATE.size)).next_fast == \
        (start + 2000) & 0xFFFFFFFF
    # A position of its own more than 1 GB ahead of the daemon's is an old one
    # wrapped round: the daemon's counts.
    old = (start + 2000 + (3 << 30)) & 0xFFFFFFFF
    bpf.map_update(st, key, fastpath.FastState.initial(old))
    bpf.map_update(lim, key, fastpath.Limits(start, (start + 2000) & 0xFFFFFFFF, 0xFFFFFFF0,
                                             (0xFFFFFFF0 + 4000) & 0xFFFFFFFF, 0).pack())
    assert bpf.prog_test_run(prog, _seg(old, 0xFFFFFFF0, window=4000)) == 0
    assert bpf.prog_test_run(prog, _seg(start, 0xFFFFFFF0, window=4000)) == 1
    # Exactly 1 GB ahead still counts as its own; one byte more does not.
    for ahead, own in ((1 << 30, True), ((1 << 30) + 1, False)):
        mine = (start + ahead) & 0xFFFFFFFF
        bpf.map_update(st, key, fastpath.FastState.initial(mine))
        bpf.map_update(lim, key, fastpath.Limits(start, (mine + 2000) & 0xFFFFFFFF, 0xFFFFFFF0,
                                                 (0xFFFFFFF0 + 4000) & 0xFFFFFFFF, 0).pack())
        assert bpf.prog_test_run(prog, _seg(mine, 0xFFFFFFF0, window=4000)) == int(own), ahead
        bpf.map_update(st, key, fastpath.FastState.initial(mine))
        assert bpf.prog_test_run(prog, _seg(start, 0xFFFFFFF0, window=4000)) == int(not own), ahead


@pytest.fixture
def kernel_gate():
    """The gate and the recorder over the same maps as the fast program."""
    fds = []
    try:
        maps = []
        for size, name in ((fastpath.LIMITS.size, "t_limits"), (fastpath.STATE.size, "t_state"),
                           (fastpath.CLIENT.size, "t_client")):
            maps.append(bpf.map_create(fastpath.KEY.size, size, 1024, name))
            fds.append(maps[-1])
        lease = bpf.map_create(len(fastpath.LEASE_KEY), fastpath.LEASE.size, 1, "t_lease")
        fds.append(lease)
        lim, st, client = maps
        gate = bpf.prog_load(fastpath.gate(lim, st, client, lease, 300 * 10**6), fastpath.PROG_TYPE_SOCKET_FILTER,
                             "t_gate")
        fds.append(gate)
        rec = bpf.prog_load(fastpath.recorder(lim, st, client), fastpath.PROG_TYPE_SOCKET_FILTER, "t_recorder")
        fds.append(rec)
        yield lim, st, client, lease, gate, rec
    finally:
        for fd in fds:
            os.close(fd)


def _from_client(seq, ack, flags=ACK, payload=b"", window=900, options=None, ip_options=b""):
    opts = tcpseg.ts_option(7777, 111) if options is None else options
    pkt = tcpseg.build_segment(CLIENT, VIP, CPORT, SPORT, seq, ack, flags, window, opts, payload)
    return _with_ip_options(pkt, ip_options)


def _renew(lease, seconds):
    bpf.map_update(lease, fastpath.LEASE_KEY, fastpath.LEASE.pack(time.monotonic_ns() + int(seconds * 1e9)))


def test_the_recorder_keeps_each_clients_latest_ack(kernel_gate):
    lim, st, client, _lease, _gate, rec = kernel_gate
    key = fastpath.key_bytes(CLIENT, CPORT, SPORT)

    def latest():
        return fastpath.ClientAck.unpack(bpf.map_lookup(client, key, fastpath.CLIENT.size))

    assert bpf.prog_test_run(rec, _from_client(500, 1000)) == 0, "it never matches"
    assert bpf.map_lookup(client, key, fastpath.CLIENT.size) is None, "no entry of the daemon's: nothing kept"
    # We sent up to 3000 (the daemon's count; the program's own is behind it).
    bpf.map_update(lim, key, fastpath.Limits(3000, 9000, 5, 5 + (1000 << 7), 7).pack())
    bpf.map_update(st, key, fastpath.FastState.initial(2000))
    bpf.map_update(client, key, fastpath.ClientAck.initial())
    assert not latest().valid
    assert bpf.prog_test_run(rec, _from_client(500, 1000)) == 0
    assert latest() == fastpath.ClientAck(1000, True, 500, 900)
    bpf.prog_test_run(rec, _from_client(500, 900, window=5))
    assert latest() == fastpath.ClientAck(1000, True, 500, 900), "an older ack (reordered) changes nothing"
    bpf.prog_test_run(rec, _from_client(500, 1000, window=950))
    assert latest().window == 950, "the same ack and end: a window update"
    bpf.prog_test_run(rec, _from_client(500, 1000, payload=b"abc"))
    assert latest().seq_end == 503, "the same ack, a later segment"
    bpf.prog_test_run(rec, _from_client(400, 1000, payload=b"a", window=3))
    assert latest() == fastpath.ClientAck(1000, True, 503, 900), "the same ack from an earlier segment"
    bpf.prog_test_run(rec, _from_client(503, 1000, flags=PSH, payload=b"d"))
    assert latest().seq_end == 503, "no ACK flag: not an ack"
    bpf.prog_test_run(rec, _from_client(503, 1000, flags=ACK | FIN))
    assert latest().seq_end == 504, "a FIN takes a sequence number"
    bpf.prog_test_run(rec, _from_client(504, 3001))
    assert latest().ack == 1000, "beyond what we sent: our stack drops it, and so do we"
    bpf.prog_test_run(rec, _from_client(504, 3000, options=b"", ip_options=b"\x01\x01\x01\x00"))
    assert latest() == fastpath.ClientAck(3000, True, 504, 900), "all we sent; IP options"
    # The program's own position counts when it is the later one.
    bpf.map_update(st, key, fastpath.FastState.initial(5000))
    bpf.prog_test_run(rec, _from_client(504, 5000))
    assert latest().ack == 5000
    # Across the wrap.
    bpf.map_update(lim, key, fastpath.Limits(0x200, 0x9000, 5, 5, 7).pack())
    bpf.map_update(st, key, fastpath.FastState.initial(0x200))
    bpf.map_update(client, key, fastpath.CLIENT.pack(0xFFFFFF00, 1, 504, 900, 0, 0, 0, 0))
    bpf.prog_test_run(rec, _from_client(504, 0x100))
    assert latest().ack == 0x100, "a later ack across the wrap"
    bpf.prog_test_run(rec, _from_client(504, 0xFFFFFFF0))
    assert latest().ack == 0x100, "an older one across the wrap"
    assert bpf.prog_test_run(rec, b"\x45\x00") == 0


def test_the_gate_holds_what_the_lag_bound_stops_while_the_daemon_lives(kernel_gate):
    lim, st, client, lease, gate, _rec = kernel_gate
    key = fastpath.key_bytes(CLIENT, CPORT, SPORT)

    def run(pkt):
        return bpf.prog_test_run(gate, pkt)

    bpf.map_update(st, key, fastpath.FastState.initial(1000))
    bpf.map_update(lim, key, fastpath.Limits(1000, 1500, 5, 5 + (1000 << 7), 7).pack())
    _renew(lease, 5)
    assert run(_seg(1000, 5)) == 0, "no client entry: to the queue"
    bpf.map_update(client, key, fastpath.ClientAck.initial())
    assert run(_seg(1000, 5)) == 0, "no client ack recorded yet: no kick could be built"
    bpf.map_update(client, key, fastpath.CLIENT.pack(1000, 1, 5, 900, 0, 0, 0, 0))
    assert run(_seg(1000, 5, payload=b"x" * 500)) == 0, "within the lag bound: not the gate's"
    assert run(_seg(1500, 5)) == 0, "not next in order"
    t0 = time.monotonic_ns()
    assert run(_seg(1000, 5)) == 1, "beyond the lag bound: held"
    _ack, _v, _end, _win, _pad, held, _pad2, since = fastpath.CLIENT.unpack(
        bpf.map_lookup(client, key, fastpath.CLIENT.size))
    assert held == 1000 and t0 <= since <= time.monotonic_ns()
    assert fastpath.ClientAck.unpack(bpf.map_lookup(client, key, fastpath.CLIENT.size)) == \
        fastpath.ClientAck(1000, True, 5, 900, held=1000), "the recorder's fields untouched"
    assert run(_seg(1000, 5, options=b"")) == 1, "without timestamps too"
    assert run(_seg(1000, 6)) == 1, "an unconfirmed ack too: it is not sent at all"
    bpf.map_update(lease, fastpath.LEASE_KEY, fastpath.LEASE.pack(time.monotonic_ns() - 1))
    assert run(_seg(1000, 5)) == 0, "the daemon's lease ran out: to the queue (which passes it without one)"
    _renew(lease, 5)
    assert run(_seg(1000, 5)) == 1
    time.sleep(0.35)
    assert run(_seg(1000, 5)) == 0, "held past its patience (300 ms here): the daemon decides"
    bpf.map_update(lim, key, fastpath.Limits(2000, 2500, 5, 5 + (1000 << 7), 7).pack())
    assert run(_seg(2000, 5)) == 1, "another segment: its own patience"
    bpf.map_delete(lease, fastpath.LEASE_KEY)
    assert run(_seg(2000, 5)) == 0, "no lease at all"


def _fast_rule(ns):
    """The primary's bpf rules (while the daemon replaces its rules, a
    listing can fail: that counts as one still there)."""
    r = lab.sh("iptables-save", "-t", "mangle", ns=ns, check=False)
    if r.returncode != 0:
        return ["(unreadable: %s)" % r.stderr.strip()]
    return [line for line in r.stdout.splitlines() if "-m bpf" in line]


def _daemon_pid(host):
    with open(os.path.join(lab.STATE_DIR, "pids")) as f:
        return next(int(pid) for h, name, pid in (line.split() for line in f) if h == host and name == "daemon")


def test_a_download_takes_the_fast_path_and_survives_a_crash(make_lab):
    cfg = make_lab(fast_path=True)
    assert cfg.fast_path
    rules = lab.sh("iptables", "-t", "mangle", "-S", "STTCP-POUT", ns=lab.NS_PRIMARY).stdout.splitlines()
    assert "primary-fast -j ACCEPT" in rules[1] and "primary-fast-gate -j DROP" in rules[2] \
        and "NFQUEUE" in rules[3], rules
    seen = {}

    def before_crash():
        seen.update(lab.control("primary"))
        seen["held"] = bench._gate_held()

    r = scenario.run_with_crash(["download:bytes=%d,crash_at=%d" % (50 * MB, 15 * MB)], before_crash=before_crash)
    survived(r, {"download": 50 * MB})
    fast = seen["fast_path"]
    print("fast path before the crash:", fast, "held back by the gate:", seen["held"], "counters:", seen["counters"])
    assert fast["packets"] > 0, fast
    # At the default lag bound the backup's pace holds the stream back: in
    # the kernel, and the stack sends again on the next ack or kick.
    assert seen["held"] > 0 and seen["counters"].get("fast_kicks", 0) > 0, seen


def test_a_killed_primary_daemon_leaves_the_gate_open(make_lab):
    """Its rules stay (fail-open), programs and all; the gate holds nothing
    once the daemon's lease has run out, and the queue rule passes what it
    held: the download goes on, unprotected."""
    make_lab(fast_path=True)
    r = scenario.run_with_crash(["download:bytes=%d,crash_at=%d" % (40 * MB, 10 * MB)],
                                disrupt=lambda: lab.kill_daemon("primary"))
    intact(r, {"download": 40 * MB})
    assert lab.vip_owner() == ["primary"]
    assert _fast_rule(lab.NS_PRIMARY), "the rules stay when the daemon is killed"
    gap = r["connections"][0]["wire_gap_ms"]
    print("client gap across the kill: %s ms" % gap)
    # The lease (250 ms) frees what the gate holds, well before its patience
    # (1 s) would, and before the stack's probes after that (1.4 s).
    assert gap < 900, gap


def test_a_backup_that_stops_keeping_up_is_given_up_not_waited_for(make_lab):
    """The backup's application stops (its daemon runs on): the lag bound
    stops moving, and the primary runs on to it (25 ms of the backup's last
    pace beyond its output). The gate holds the primary's next segment for its patience
    (1 s; the stack tries again at its next probe), then lets it to the
    queue, where the daemon holds it for its lag hold (2 s) and gives the
    connection up; the download completes, unprotected."""
    make_lab(fast_path=True)
    daemon = _daemon_pid("backup")
    stopped = []
    held = []

    def stop_backup_app():
        held.append(bench._gate_held())
        t, wall = time.monotonic(), time.time()
        for pid in lab._ns_pids([lab.NS_BACKUP]) - {daemon}:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        return t, wall

    try:
        # (Longer than the lead a stopped backup leaves: the bound follows its
        # pace, up to 64 MB, and 30 MB once went by within it.)
        r = scenario.run_with_crash(["download:bytes=%d,crash_at=%d" % (200 * MB, 8 * MB)], disrupt=stop_backup_app)
        st = lab.control("primary")
        held.append(bench._gate_held())
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert stopped, "nothing of the backup's application was found to stop"
    intact(r, {"download": 200 * MB}, st)
    mine = [c for c in st["connections"] if c["conn"].startswith(lab.CLIENT_IP + ":")
            and int(c["conn"].split()[0].split(":")[1]) == r["connections"][0]["local_port"]]
    assert mine and not mine[0]["protected"] and mine[0]["reason"] == "backup stopped keeping up", mine
    gap = r["connections"][0]["wire_gap_ms"]
    print("client gap: %s ms (the gate's patience, then the lag hold); gate drops %s" % (gap, held))
    assert held[1] > held[0], "the gate held the stream while the backup stood still"
    assert 2000 < gap < 6000, gap
    assert lab.vip_owner() == ["primary"]


def test_a_fast_path_on_the_primary_alone_keeps_every_connection_protected(make_lab):
    """The backup, configured without it, learns from each ISN message that
    no digests follow: past divergence.MAX_AHEAD (16 MB) of output without
    one, it used to give the connection up as unverifiable."""
    make_lab(fast_path=True, start_backup=False)
    start_backup_with(r"^fast_path = true$", "fast_path = false", "fast_path = true")
    seen = {}
    r = scenario.run_with_crash(["download:bytes=%d,crash_at=%d" % (80 * MB, 24 * MB)],
                                before_crash=lambda: seen.update(lab.control("backup")))
    survived(r, {"download": 80 * MB})
    assert seen["summary"]["unprotected"] == 0, seen["connections"]


def test_status_says_what_the_fast_path_sent(make_lab):
    make_lab(fast_path=True)
    scenario.run_with_crash(["download:bytes=%d,crash_at=%d" % (20 * MB, 5 * MB)], crash=False)
    out = subprocess.run([sys.executable, "-m", "nfq_sttcp", "status", "--config", lab.config_path(),
                          "--control-socket", lab.control_path("primary")], capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if "fast path:" in x]
    assert out.returncode == 0 and line and " 0 segments" not in line[0], out.stdout + out.stderr


def test_mixed_workloads_on_the_fast_path_survive_a_crash(make_lab):
    make_lab(fast_path=True)
    seen = {}
    r = scenario.run_with_crash(MIXED,
                                before_crash=lambda: seen.update(lab.control("primary")))
    survived(r, MIXED_BYTES)
    assert seen["fast_path"]["packets"] > 0, seen["fast_path"]


def test_a_switchover_fences_the_fast_path_too(make_lab):
    """The fence replaces the primary's rules: the match goes with the queue
    rule, so not one segment of the stepped-down primary leaves by it."""
    make_lab(fast_path=True)
    report = scenario.run_with_crash(["download:bytes=%d,rate_kbps=100000,crash_at=%d" % (20 * MB, 6 * MB),
                                      "echo:count=30,size=3000,pause_ms=20,crash_msg=8,after=10"],
                                     disrupt=lambda: lab.switchover(progress=lambda *_: None)[1:])
    survived(report, {"download": 20 * MB})
    assert not _fast_rule(lab.NS_PRIMARY)
    rules = lab.sh("iptables-save", "-t", "mangle", ns=lab.NS_PRIMARY).stdout
    assert "-j DROP" in rules and "NFQUEUE" not in rules and "bpf" not in rules, rules


def test_the_daemon_removes_its_program_and_mount_when_it_stops(make_lab):
    cfg = make_lab(fast_path=True)
    pinned = lab.control("primary")["fast_path"]["program"]
    assert pinned.startswith(cfg.control_socket_dir)
    pid = _daemon_pid("primary")
    lab.kill_daemon("primary", signal.SIGTERM)
    deadline = time.monotonic() + 10
    # (The rule and the directory go during the daemon's teardown, before it
    # exits: wait for all three.)
    while time.monotonic() < deadline and (_fast_rule(lab.NS_PRIMARY) or os.path.exists(os.path.dirname(pinned))
                                           or not lab._gone(pid)):
        time.sleep(0.1)
    assert not _fast_rule(lab.NS_PRIMARY)
    assert not os.path.exists(os.path.dirname(pinned))  # (nor the mount on it, nor the pin in it)
    assert lab._gone(pid)
