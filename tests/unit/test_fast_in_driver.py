"""The driver's side of the backup's inbound program (driver.FastIn) against
a fake bpf module and a fake tc: the entries it writes, what it reads back
into the core, and its cleanup. The real program is in
tests/netns/test_fast_inbound.py."""

import os

import pytest

from nfq_sttcp import driver, fastin, firewall
from nfq_sttcp.config import Config
from nfq_sttcp.driver import FastIn
from nfq_sttcp.tcpseg import ACK, FIN, PSH, RST

from .helpers import KEY, VIP, from_client, from_server
from .test_fast_driver import FakeBpf
from .test_fast_inbound import RCV_HI, established


class _Calls(list):
    markers: list


@pytest.fixture
def tc(monkeypatch):
    calls = _Calls()
    calls.markers = []
    monkeypatch.setattr(firewall, "tc_attach_ingress",
                        lambda ifname, pinned, marker: calls.markers.append(marker) or calls.append(("attach", ifname))
                        or True)
    monkeypatch.setattr(firewall, "tc_detach_ingress",
                        lambda ifname, qdisc, marker: calls.append(("detach", ifname, qdisc)))
    return calls


def _cfg(tmp_path):
    return Config(vip=VIP, ports=(7000,), lan_interface="lan0", primary_sync="10.78.0.1", backup_sync="10.78.0.2",
                  control_socket_dir=str(tmp_path / "ctl"))


@pytest.fixture
def fast_in(tmp_path, tc):
    f = FastIn(_cfg(tmp_path), "sync0", FakeBpf())
    yield f
    f.close()
    assert not os.path.exists(f.dir), "close removes the pin and its directory"
    assert tc[-1] == ("detach", "sync0", True)
    assert tc.markers == [str(tmp_path / "ctl" / "clsact-sync0")]  # (the file that says whose the qdisc is)


def test_entries_follow_the_core_and_what_the_kernel_saw_reaches_it(fast_in):
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x" * 100, tsval=1100, tsecr=7010, window=1000), 0.1)
    assert fast_in.sync(b) == 0 and not b.fast_in_dirty
    kb = fast_in.entries[KEY][0]
    assert kb == fastin.key_bytes(KEY[0], KEY[1], KEY[3])
    assert fastin.LIMITS.unpack(fast_in.bpf.maps[fast_in.limits][kb])[:6] == (201, 5001, 0, 4100, 6950, RCV_HI)
    assert fastin.InState.unpack(fast_in.bpf.maps[fast_in.state][kb]).next_fast == 201
    # The kernel maps two segments; the state it wrote is not reset by the next sync.
    fast_in.bpf.maps[fast_in.state][kb] = fastin.STATE.pack(801, 1300, 7070, 1, 5001, 1000, 901, 0, 2, 600)
    b.on_outbound(from_server(901, 201), 0.2)  # our stack acks: the window test moves
    assert fast_in.sync(b) == 0
    assert fastin.InState.unpack(fast_in.bpf.maps[fast_in.state][kb]).next_fast == 801
    assert fast_in.absorb(b, [KEY]) == 0
    assert fast_in.packets == 2 and b.conns[KEY].client_tsval == 1300 and b.conns[KEY].client_max_tsecr == 7070
    # The core maps one the kernel would not (an echo of 0): the entry goes, what the kernel saw read first.
    fast_in.bpf.maps[fast_in.state][kb] = fastin.STATE.pack(901, 1400, 7080, 1, 5001, 1000, 901, 0, 3, 700)
    b.on_inbound(from_client(901, 5001, ACK | PSH, b"y", tsval=1401, tsecr=0), 0.3)
    assert fast_in.sync(b) == 0
    assert KEY not in fast_in.entries and not fast_in.bpf.maps[fast_in.limits] and not fast_in.bpf.maps[fast_in.state]
    assert fast_in.packets == 3 and b.conns[KEY].client_tsval == 1401


def test_a_position_left_far_behind_is_brought_up(fast_in):
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x" * 100, tsval=1100, tsecr=7010, window=1000), 0.1)
    fast_in.sync(b)
    kb = fast_in.entries[KEY][0]
    b.conns[KEY].fast_next = 101 + (300 << 20)  # the daemon mapped 300 MB, the kernel nothing
    b.fast_in_dirty.add(KEY)
    fast_in.sync(b)
    fast_in.absorb(b, [KEY])
    assert fastin.InState.unpack(fast_in.bpf.maps[fast_in.state][kb]).next_fast == 101 + (300 << 20)


def test_map_errors_cost_the_entry_not_the_daemon(fast_in):
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    fast_in.bpf.fail_updates = True
    assert fast_in.sync(b) == 1 and KEY not in fast_in.entries
    fast_in.bpf.fail_updates = False
    b.fast_in_dirty.add(KEY)
    assert fast_in.sync(b) == 0 and KEY in fast_in.entries
    fast_in.bpf.fail_lookups = True
    assert fast_in.absorb(b, [KEY]) == 1 and KEY not in fast_in.entries


def test_takeover_switches_it_off_and_reads_everything_back(fast_in):
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    fast_in.sync(b)
    assert fast_in.bpf.maps[fast_in.on] == {fastin.ON_KEY: b"\1\0\0\0"}
    fast_in.bpf.maps[fast_in.state][fast_in.entries[KEY][0]] = fastin.STATE.pack(901, 1600, 7095, 1, 5001, 1000, 901, 0, 5, 900)
    assert fast_in.switch_off(b) == 0
    assert not fast_in.bpf.maps[fast_in.on], "the program maps nothing from now on"
    assert b.conns[KEY].client_tsval == 1600 and b.conns[KEY].client_max_tsecr == 7095


def test_the_sweep_forgets_the_entries_of_forgotten_connections(fast_in):
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    fast_in.sync(b)
    del b.conns[KEY]  # (as if the core had dropped it without a word)
    fast_in.sweep(b)
    assert not fast_in.entries and not fast_in.bpf.maps[fast_in.limits] and not fast_in.bpf.maps[fast_in.state]


def test_a_connection_that_closes_or_is_forgotten_loses_its_entry(fast_in):
    b = established(closed_linger_s=1.0)
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    fast_in.sync(b)
    b.on_outbound(from_server(901, 102, RST | ACK), 0.2)  # our application aborts
    assert KEY in b.fast_in_dirty
    fast_in.sync(b)
    assert KEY not in fast_in.entries
    b.on_inbound(from_client(102, 5001, ACK | PSH, b"y", tsval=1101, tsecr=7010), 0.3)
    fast_in.sync(b)
    assert KEY not in fast_in.entries, "closing: no entry again"
    b.on_tick(5.0)
    assert KEY not in b.conns and KEY in b.fast_in_dirty


def test_the_detach_reads_everything_back(tmp_path, tc):
    f = FastIn(_cfg(tmp_path), "sync0", FakeBpf())
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    f.sync(b)
    f.bpf.maps[f.state][f.entries[KEY][0]] = fastin.STATE.pack(901, 1500, 7090, 1, 5001, 1000, 901, 0, 4, 800)
    f.close(b)
    assert b.conns[KEY].client_tsval == 1500 and f.packets == 4 and not f.entries
    assert tc == [("attach", "sync0"), ("detach", "sync0", True)] and not os.path.exists(f.dir)


def test_a_failed_attach_leaves_nothing_behind(tmp_path, monkeypatch):
    def refuse(ifname, pinned, marker):
        raise firewall.FirewallError("tc not found: install the iproute2 package")

    monkeypatch.setattr(firewall, "tc_attach_ingress", refuse)
    bpf = FakeBpf()
    with pytest.raises(firewall.FirewallError):
        FastIn(_cfg(tmp_path), "sync0", bpf)
    assert not os.path.exists(os.path.join(str(tmp_path), "ctl", "bpf"))


def test_the_daemon_goes_on_without_it_when_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "_ethernet_link_of", lambda address: "sync0")

    def refuse(ifname, pinned, marker):
        raise firewall.FirewallError("cannot add a clsact qdisc on sync0: no such device")

    monkeypatch.setattr(firewall, "tc_attach_ingress", refuse)
    d = driver.Daemon(_cfg(tmp_path), "backup")
    assert d.backup.cfg.fast_inbound
    d.backup.fast_in_dirty.add(KEY)
    d._start_fast_in()
    assert d.fast_in is None and not d.backup.cfg.fast_inbound and not d.backup.fast_in_dirty


class FakeTc:
    """tc's answers, and the commands it was given."""

    def __init__(self, qdiscs="", fail=()):
        self.qdiscs, self.fail, self.calls = qdiscs, fail, []

    def __call__(self, *args):
        import subprocess
        self.calls.append(" ".join(args))
        bad = any(" ".join(args).startswith(f) for f in self.fail)
        out = self.qdiscs if args[:2] == ("qdisc", "show") else ""
        return subprocess.CompletedProcess(("tc",) + args, 2 if bad else 0, out, "Error: no" if bad else "")


def test_attaching_adds_clsact_only_where_there_is_none(monkeypatch):
    monkeypatch.setattr(firewall.shutil, "which", lambda tool: "/usr/sbin/" + tool)
    t = FakeTc("qdisc noqueue 0: root refcnt 2\n")
    monkeypatch.setattr(firewall, "_tc", t)
    assert firewall.tc_attach_ingress("sync0", "/pin") is True
    assert t.calls == ["qdisc show dev sync0", "qdisc add dev sync0 clsact",
                       "filter del dev sync0 ingress pref 22295",
                       "filter add dev sync0 ingress pref 22295 handle 1 bpf object-pinned /pin direct-action"]
    # One there already (a killed daemon's, or someone else's): "tc qdisc add"
    # would fail with "Exclusivity flag on", so it is not tried.
    t = FakeTc("qdisc noqueue 0: root refcnt 2\nqdisc clsact ffff: parent ffff:fff1\n")
    monkeypatch.setattr(firewall, "_tc", t)
    assert firewall.tc_attach_ingress("sync0", "/pin") is False and "qdisc add dev sync0 clsact" not in t.calls
    monkeypatch.setattr(firewall, "_tc", FakeTc("qdisc ingress ffff: parent ffff:fff1\n"))
    with pytest.raises(firewall.FirewallError, match="needs clsact"):
        firewall.tc_attach_ingress("sync0", "/pin")
    t = FakeTc("", fail=("filter add",))
    monkeypatch.setattr(firewall, "_tc", t)
    with pytest.raises(firewall.FirewallError, match="cannot attach"):
        firewall.tc_attach_ingress("sync0", "/pin")
    assert t.calls[-1] == "qdisc del dev sync0 clsact", "the qdisc it added goes again"
    monkeypatch.setattr(firewall.shutil, "which", lambda tool: None)
    with pytest.raises(firewall.FirewallError, match="iproute2"):
        firewall.tc_attach_ingress("sync0", "/pin")



def test_our_output_reads_back_what_the_kernel_saw_of_its_connection(fast_in):
    """Before the core decides on one of our stack's segments, it learns the
    client's acks the kernel mapped: bytes the client has are dropped and
    acked into our stack, not held."""
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    fast_in.sync(b)
    kb = fast_in.entries[KEY][0]
    ours = from_server(901, 102, ACK | PSH, b"z" * 100)
    assert fast_in.key_of(ours, inbound=False) == KEY and fast_in.carries_data(ours)
    assert fast_in.key_of(from_client(102, 5001, ACK), inbound=True) == KEY
    assert not fast_in.carries_data(from_server(1001, 102)), "a pure ack of ours"
    assert fast_in.carries_data(from_server(1001, 102, ACK | FIN)), "a FIN"
    for short in (ours[:22], b"", ours[:1]):
        assert fast_in.key_of(short, inbound=False) is None and not fast_in.carries_data(short)
    # The kernel mapped an ack for 100 bytes we have not sent yet (clamped to 901).
    fast_in.bpf.maps[fast_in.state][kb] = fastin.STATE.pack(102, 1200, 7020, 1, 5101, 1000, 901, 0, 1, 0)
    assert fast_in.absorb(b, [KEY]) == 0
    acts = b.on_outbound(ours, 0.2)
    assert [type(a).__name__ for a in acts] == ["Drop"] and KEY in b.self_ack_due
    fast_in._drop(KEY)
    assert not fast_in.by_bytes and fast_in.key_of(ours, inbound=False) is None


def test_an_entry_is_read_back_only_into_the_connection_it_was_written_for(fast_in):
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010), 0.1)
    fast_in.sync(b)
    kb = fast_in.entries[KEY][0]
    fast_in.bpf.maps[fast_in.state][kb] = fastin.STATE.pack(102, 1200, 7020, 1, 5101, 1000, 901, 0, 1, 0)
    b.conns[KEY].client_isn = 777  # (as if a new connection on the same addresses and ports held the key)
    assert fast_in.absorb(b, [KEY]) == 0
    assert b.conns[KEY].client_ack_b == 901 and b.conns[KEY].client_tsval == 1100, "the old one's state is not read in"


def test_what_the_daemon_maps_after_reading_back_stays_the_latest(fast_in):
    """The kernel mapped a request (window 0); the client then opened its
    window with a pure ack, which the daemon maps: read back before it, the
    kernel's older window never overwrites the daemon's newer one."""
    b = established()
    b.on_inbound(from_client(101, 5001, ACK | PSH, b"x", tsval=1100, tsecr=7010, window=500), 0.1)
    fast_in.sync(b)
    kb = fast_in.entries[KEY][0]
    fast_in.bpf.maps[fast_in.state][kb] = fastin.STATE.pack(103, 1101, 7010, 1, 5001, 0, 901, 0, 1, 1)
    opening = from_client(103, 5001, ACK, tsval=1102, tsecr=7010, window=1000)
    assert fast_in.key_of(opening, inbound=True) == KEY
    fast_in.absorb(b, [KEY])  # (the driver's read before the core maps a segment)
    assert b.conns[KEY].client_window == 0
    b.on_inbound(opening, 0.2)
    assert b.conns[KEY].client_window == 1000
    fast_in.sync(b, first=KEY)  # a pure ack: the entry goes, read back once more
    assert KEY not in fast_in.entries and b.conns[KEY].client_window == 1000
