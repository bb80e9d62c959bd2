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

from nfq_sttcp import bpf, fastpath, lab, scenario, tcpseg
from nfq_sttcp.tcpseg import ACK, FIN, PSH, RST, SYN

from .checks import start_backup_with, survived

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
    if ip_options:  # an IPv4 header with options (IHL 6)
        pkt = bytes([0x46]) + pkt[1:2] + (len(pkt) + 4).to_bytes(2, "big") + pkt[4:20] + ip_options + pkt[20:]
    return pkt


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
    assert "-m bpf --object-pinned" in rules[1] and "NFQUEUE" in rules[2], rules
    seen = {}
    r = scenario.run_with_crash(["download:bytes=%d,crash_at=%d" % (50 * MB, 15 * MB)],
                                before_crash=lambda: seen.update(lab.control("primary")))
    survived(r, {"download": 50 * MB})
    fast = seen["fast_path"]
    print("fast path before the crash:", fast, "queued:", seen["counters"])
    assert fast["packets"] > 0, fast


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
    r = scenario.run_with_crash(["download:bytes=%d,rate_kbps=40000,crash_at=%d" % (12 * MB, 3 * MB),
                                 "upload:bytes=%d,rate_kbps=40000,crash_at=%d" % (12 * MB, 3 * MB),
                                 "echo:count=30,size=3000,pause_ms=20,crash_msg=8,after=10",
                                 "rr:count=30,size=20000,pause_ms=20,crash_msg=10,after=5",
                                 "banner:lines=30,pause_ms=20,crash_line=8,after=10"],
                                before_crash=lambda: seen.update(lab.control("primary")))
    survived(r, {"download": 12 * MB, "upload": 12 * MB})
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
