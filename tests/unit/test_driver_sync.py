"""The driver's receive loop for sync messages, fed datagrams by a fake socket."""

import pytest

from nfq_sttcp import driver, syncproto
from nfq_sttcp.config import Config
from nfq_sttcp.syncproto import Heartbeat, Unprotect


class _Socket:
    def __init__(self, datagrams):
        self.datagrams = list(datagrams)

    def recvfrom(self, size):
        if not self.datagrams:
            raise BlockingIOError
        return self.datagrams.pop(0)


def _daemon(tmp_path, datagrams):
    cfg = Config(vip="10.77.0.100", ports=(7000,), lan_interface="lan0", primary_sync="10.78.0.1",
                 backup_sync="10.78.0.2", control_socket_dir=str(tmp_path / "ctl"))
    d = driver.Daemon(cfg, "backup")
    d.sync = _Socket(datagrams)
    d._maybe_heartbeat = lambda: None
    return d


KEY_A, KEY_B = ("10.77.0.10", 40000, "10.77.0.100", 7000), ("10.77.0.10", 40001, "10.77.0.100", 7000)


def test_a_message_that_trips_a_fault_costs_that_message_not_the_daemon(tmp_path):
    msgs = [(syncproto.encode(Unprotect((key,)), 7, n, None), ("10.78.0.1", 9500))
            for n, key in ((1, KEY_A), (2, KEY_B))]
    d = _daemon(tmp_path, msgs)
    seen = []

    def on_sync(msg, now, addr, epoch):
        seen.append(msg.keys[0])
        if len(seen) == 1:
            raise KeyError("a fault of ours")
    d._on_sync = on_sync
    d._on_sync_readable()
    assert seen == [KEY_A, KEY_B], "the message after the faulty one is still handled"
    assert d.counters["handler_errors"] == 1


def test_a_heartbeat_that_fails_still_ends_the_daemon(tmp_path):
    """A heartbeat can start a takeover; one that failed half-way must not
    leave the daemon running in a state nothing moves it out of."""
    beat = (syncproto.encode(Heartbeat("primary", "serving", 1), 7, 1, None), ("10.78.0.1", 9500))
    d = _daemon(tmp_path, [beat])

    def on_sync(msg, now, addr, epoch):
        raise KeyError("a fault of ours")
    d._on_sync = on_sync
    with pytest.raises(KeyError):
        d._on_sync_readable()


def test_a_stranger_and_garbage_are_counted_as_rejected(tmp_path):
    good = syncproto.encode(Heartbeat("primary", "serving", 1), 7, 1, None)
    d = _daemon(tmp_path, [(good, ("10.9.9.9", 9500)), (b"\x00" * 7, ("10.78.0.1", 9500))])
    d._on_sync = lambda *a: (_ for _ in ()).throw(AssertionError("must not be handled"))
    d._on_sync_readable()
    assert d.counters["sync_rejected"] == 2 and d.counters["handler_errors"] == 0
