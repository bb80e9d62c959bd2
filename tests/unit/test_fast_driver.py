"""The driver's side of the fast path (driver.FastPath) against a fake bpf
module: which map entries it writes, for which connection, and what it
tells the core. The real maps and program are in tests/netns/test_fast_path.py."""

import dataclasses
import os

import pytest

from nfq_sttcp import fastpath, tcpseg
from nfq_sttcp.config import Config
from nfq_sttcp.driver import FastPath
from nfq_sttcp.fastpath import FastState
from nfq_sttcp.primary import PrimaryConfig, PrimaryCore
from nfq_sttcp.syncproto import Confirm, ConfirmEntry

from .helpers import KEY, VIP, from_server, server_synack


class FakeBpf:
    """Maps as dicts; a map fd is a real fd (of /dev/null) so that close works."""

    class BpfError(Exception):
        pass

    def __init__(self, fail_updates: bool = False):
        self.maps: dict[int, dict[bytes, bytes]] = {}
        self.fail_updates = fail_updates
        self.fail_lookups = False
        self.pinned: list[str] = []

    def ensure_bpffs(self, path):
        os.makedirs(path, exist_ok=True)
        return True

    def is_bpffs(self, path):
        return False

    def unmount(self, path):
        pass

    def map_create(self, key_size, value_size, max_entries, name):
        fd = os.open(os.devnull, os.O_RDONLY)
        self.maps[fd] = {}
        return fd

    def prog_load(self, insns, prog_type, name):
        assert len(insns) % 8 == 0
        return os.open(os.devnull, os.O_RDONLY)

    def obj_pin(self, fd, path):
        open(path, "w").close()
        self.pinned.append(path)

    def map_update(self, fd, key, value):
        if self.fail_updates:
            raise OSError(28, "No space left on device")
        self.maps[fd][key] = value

    def map_lookup(self, fd, key, size):
        if self.fail_lookups:
            raise OSError(14, "Bad address")
        return self.maps[fd].get(key)

    def map_delete(self, fd, key):
        self.maps[fd].pop(key, None)


def confirmed_primary(isn=5000, max_lag=100000):
    p = PrimaryCore(PrimaryConfig(VIP, frozenset({7000}), max_lag=max_lag, fast_path=True))
    p.backup_following = True
    p.on_outbound(server_synack(isn, 100, 7000), 0)
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, isn + 1, (), None),)), 0)
    p.on_outbound(from_server(isn + 1, 101, payload=b"hello"), 0)
    return p


@pytest.fixture
def fast(tmp_path):
    cfg = Config(vip=VIP, ports=(7000,), lan_interface="lan0", primary_sync="10.78.0.1", backup_sync="10.78.0.2",
                 control_socket_dir=str(tmp_path / "ctl"))
    f = FastPath(cfg, FakeBpf())
    yield f
    f.close()
    assert not os.path.exists(f.dir), "close removes the pin and its directory"


def kernel_sends(f, key, next_fast, packets, tsval=9000):
    """What the program writes when it lets segments out."""
    kb = f.entries[key][0]
    f.bpf.maps[f.state][kb] = fastpath.STATE.pack(next_fast, 101, 400, tsval, 1000, 0, packets, packets * 1000)


def test_entries_follow_the_cores_limits_and_the_kernels_sends_reach_the_core(fast):
    p = confirmed_primary()
    assert fast.sync(p) == 0 and not p.fast_dirty
    kb = fast.entries[KEY][0]
    assert fastpath.LIMITS.unpack(fast.bpf.maps[fast.limits][kb])[:3] == (5006, 5001 + 100000, 101)
    assert FastState.unpack(fast.bpf.maps[fast.state][kb]).next_fast == 5006
    kernel_sends(fast, KEY, 9006, 4)
    fast.absorb(p, [KEY], 1.0)
    c = p.conns[KEY]
    assert (c.snd_nxt, c.tsval, c.window, fast.packets) == (9006, 9000, 400, 4)
    # The backup confirms more: only the limits change, the program's own position stays.
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, 9006, (), None),)), 1.0)
    fast.sync(p)
    assert fastpath.LIMITS.unpack(fast.bpf.maps[fast.limits][kb])[:2] == (9006, 9006 + 100000)
    assert FastState.unpack(fast.bpf.maps[fast.state][kb]).next_fast == 9006


def test_a_connection_that_stops_qualifying_loses_its_entries_after_its_last_sends_are_read(fast):
    p = confirmed_primary()
    fast.sync(p)
    kernel_sends(fast, KEY, 7006, 2, tsval=7777)
    p.set_backup_following(False, 2.0)  # unprotected: never fast again
    fast.sync(p)
    assert KEY not in fast.entries and not fast.bpf.maps[fast.limits] and not fast.bpf.maps[fast.state]
    assert (p.conns[KEY].snd_nxt, p.conns[KEY].tsval, fast.packets) == (7006, 7777, 2)
    # A FIN of ours (newer than anything fast) closes another: its own timestamp stands.
    p = confirmed_primary()
    fast.sync(p)
    kernel_sends(fast, KEY, 7006, 3, tsval=7777)
    p.on_outbound(from_server(7006, 101, flags=0x11, tsval=7800), 2.0)
    fast.sync(p)
    assert KEY not in fast.entries and (p.conns[KEY].snd_nxt, p.conns[KEY].tsval) == (7007, 7800)


def test_a_new_connection_on_the_same_ports_never_inherits_the_old_ones_entry(fast):
    p = confirmed_primary(isn=5000)
    fast.sync(p)
    kernel_sends(fast, KEY, 8000, 3)
    # The client comes back from the same port; our stack picks another ISN.
    p.on_outbound(server_synack(700000, 100, 7000), 3.0)
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, 700001, (), None),)), 3.0)
    p.on_outbound(from_server(700001, 101, payload=b"again"), 3.0)
    fast.absorb(p, [KEY], 3.0)  # (the new connection: the old state is not its)
    assert p.conns[KEY].snd_nxt == 700006 and fast.packets == 0
    fast.sync(p)
    kb = fast.entries[KEY][0]
    assert fast.entries[KEY][1] == 700000
    assert FastState.unpack(fast.bpf.maps[fast.state][kb]).next_fast == 700006


def test_a_map_that_refuses_an_entry_leaves_that_connection_to_the_queue(tmp_path):
    cfg = Config(vip=VIP, ports=(7000,), lan_interface="lan0", primary_sync="10.78.0.1", backup_sync="10.78.0.2",
                 control_socket_dir=str(tmp_path / "ctl"))
    f = FastPath(cfg, FakeBpf(fail_updates=True))
    try:
        p = confirmed_primary()
        assert f.sync(p) == 1
        assert KEY not in f.entries and not f.bpf.maps[f.limits] and not p.fast_dirty
    finally:
        f.close()


def test_a_burst_of_marked_connections_is_synced_a_budget_at_a_time(fast):
    """(Losing the backup marks every connection at once.)"""
    p = confirmed_primary()
    fast.sync(p)
    keys = [("10.77.0.%d" % (i % 250), 1000 + i, VIP, 7000) for i in range(600)]
    for k in keys:
        p.conns[k] = dataclasses.replace(p.conns[KEY], key=k)
    p.fast_dirty.update(keys)
    assert fast.sync(p) == 0
    assert len(p.fast_dirty) == 600 - fast.SYNC_BUDGET and len(fast.entries) == 1 + fast.SYNC_BUDGET
    assert fast.sync(p) == 0 and not p.fast_dirty and len(fast.entries) == 601
    assert len(fast.bpf.maps[fast.limits]) == len(fast.bpf.maps[fast.state]) == 601
    p.set_backup_following(False, 9.0)  # every entry goes, a budget per turn
    turns = 0
    while p.fast_dirty:
        fast.sync(p)
        turns += 1
    assert turns == 2 and not fast.entries and not fast.bpf.maps[fast.limits] and not fast.bpf.maps[fast.state]


def test_the_programs_position_is_brought_up_when_nothing_went_fast_for_long(fast):
    p = confirmed_primary()
    fast.sync(p)
    kb = fast.entries[KEY][0]
    c = p.conns[KEY]
    c.snd_nxt = (5006 + (300 << 20)) & 0xFFFFFFFF  # 300 MB later, all through the queue
    p.fast_dirty.add(KEY)
    fast.sync(p)
    fast.absorb(p, [KEY], 5.0)
    assert FastState.unpack(fast.bpf.maps[fast.state][kb]).next_fast == c.snd_nxt


def test_a_state_that_cannot_be_read_costs_its_connection_the_entry_not_the_daemon(fast):
    p = confirmed_primary()
    fast.sync(p)
    fast.bpf.fail_lookups = True
    assert fast.absorb(p, [KEY], 1.0) == 1
    assert KEY not in fast.entries and not fast.bpf.maps[fast.limits] and not fast.bpf.maps[fast.state]


def _client_acked(f, key, ack, window=800, held=None):
    """What the recorder writes (the client's latest ack, the end of its
    segment, 101, its window) and the gate (the segment it holds: at ``held``)."""
    f.bpf.maps[f.client][f.entries[key][0]] = fastpath.CLIENT.pack(ack, 1, 101, window, 0, held or 0, 0,
                                                                  0 if held is None else 12345)


def test_a_raised_lag_bound_kicks_a_connection_with_nothing_in_flight(fast):
    p = confirmed_primary()
    fast.sync(p)
    kb = fast.entries[KEY][0]
    assert fastpath.ClientAck.unpack(fast.bpf.maps[fast.client][kb]) == fastpath.ClientAck(0, False, 0, 0), \
        "a new entry: no client ack yet"
    kernel_sends(fast, KEY, 9006, 4)
    fast.absorb(p, [KEY], 1.0)
    _client_acked(fast, KEY, 9006)  # it acked all we sent, but the gate holds nothing
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, 8006, (), None),)), 1.0)
    fast.sync(p)
    assert fast.kicks == []
    _client_acked(fast, KEY, 9006, held=9006)  # now it does
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, 9006, (), None),)), 1.0)
    fast.sync(p)
    assert len(fast.kicks) == 1
    seg = tcpseg.parse(fast.kicks.pop())
    # Our stack's own ack (101) and echo (1000, from the fast segment it sent last); its TSval as the echo.
    assert (seg.src, seg.dst, seg.seq, seg.ack, seg.flags, seg.window, seg.tsval, seg.tsecr, seg.payload_len) == \
        (KEY[0], VIP, 101, 9006, tcpseg.ACK, 800, 1000, 9000, 0)
    # Data in flight (the client acked less): its next ack retries, no kick.
    _client_acked(fast, KEY, 8006, held=9006)
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, 10006, (), None),)), 2.0)
    fast.sync(p)
    assert fast.kicks == []
    # A confirmation that leaves the lag bound where it was kicks nothing either.
    _client_acked(fast, KEY, 9006, held=9006)
    p.on_confirm(Confirm((ConfirmEntry(KEY, 102, 10006, (), None),)), 3.0)
    fast.sync(p)
    assert fast.kicks == []


def test_no_kick_where_the_old_bound_was_too_far_ahead_to_hold_anything(fast):
    p = confirmed_primary(max_lag=4 << 20)
    fast.sync(p)
    _client_acked(fast, KEY, 5006, held=5006)
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, 5006, (), None),)), 1.0)
    fast.sync(p)
    assert fast.kicks == [], "4 MB of room before: the gate held nothing, nothing to kick"


def test_a_kick_goes_by_the_kernels_position_when_ours_is_stale(fast):
    """With a bound of megabytes (the backup's pace), the kernel can have
    sent up to the bound while the daemon, which reads its position back
    only now and then, still has it megabytes behind: the kick is decided
    on the kernel's position."""
    p = confirmed_primary(max_lag=4 << 20)
    fast.sync(p)
    edge = 5001 + (4 << 20)
    kernel_sends(fast, KEY, edge, 3000)  # (not read back: the daemon's snd_nxt is 5006)
    _client_acked(fast, KEY, edge, held=edge)
    p.on_confirm(Confirm((ConfirmEntry(KEY, 101, 5006, (), None),)), 1.0)
    fast.sync(p)
    assert len(fast.kicks) == 1 and tcpseg.parse(fast.kicks[0]).ack == edge


def test_entries_that_go_take_the_client_record_with_them_and_kick_what_the_gate_held(fast):
    p = confirmed_primary()
    fast.sync(p)
    kb = fast.entries[KEY][0]
    _client_acked(fast, KEY, 5006, held=5006)  # all we sent ("hello"), by the daemon's count; the next held
    p.set_backup_following(False, 1.0)
    fast.sync(p)
    assert KEY not in fast.entries
    assert all(kb not in fast.bpf.maps[fd] for fd in (fast.limits, fast.state, fast.client))
    assert len(fast.kicks) == 1, "without its limits the gate holds nothing: the stack must try again now"
    assert tcpseg.parse(fast.kicks[0]).ack == 5006


def test_the_lease_is_renewed_at_most_every_renew_s(fast):
    fast.renew(10.0)
    (until,) = fastpath.LEASE.unpack(fast.bpf.maps[fast.lease][fastpath.LEASE_KEY])
    assert until == int((10.0 + FastPath.LEASE_S) * 1e9)
    fast.renew(10.0 + FastPath.RENEW_S / 2)
    assert fastpath.LEASE.unpack(fast.bpf.maps[fast.lease][fastpath.LEASE_KEY])[0] == until
    fast.renew(10.0 + FastPath.RENEW_S)
    assert fastpath.LEASE.unpack(fast.bpf.maps[fast.lease][fastpath.LEASE_KEY])[0] > until
