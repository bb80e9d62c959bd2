"""The daemon's epoch file: each life's epoch outgrows the last one's, on a
real file in a temporary directory."""

import os
import time

import pytest
from structlog.testing import capture_logs

from nfq_sttcp import driver
from nfq_sttcp.config import Config

HOUR_NS = 3600 * 10**9


def _daemon(state_dir, role="backup"):
    cfg = Config(vip="10.77.0.100", ports=(7000,), lan_interface="lan0", primary_sync="10.78.0.1",
                 backup_sync="10.78.0.2", state_dir=str(state_dir))
    return driver.Daemon(cfg, role)


def test_the_first_life_takes_the_clock_and_keeps_it(tmp_path):
    before = time.time_ns()
    epoch = _daemon(tmp_path / "state")._claim_epoch()
    assert before <= epoch <= time.time_ns()
    path = tmp_path / "state" / "epoch-10.78.0.2"
    assert int(path.read_text()) == epoch
    assert path.stat().st_mode & 0o077 == 0


def test_a_clock_behind_the_last_life_continues_from_it(tmp_path):
    (tmp_path / "epoch-10.78.0.2").write_text("%d\n" % (time.time_ns() + HOUR_NS))
    last = int((tmp_path / "epoch-10.78.0.2").read_text())
    d = _daemon(tmp_path)
    with capture_logs() as logs:
        assert d._claim_epoch() == last + 1
    assert [e["event"] for e in logs] == ["clock_behind_last_epoch"]
    assert d._claim_epoch() == last + 2  # and again at the next start


def test_the_file_is_this_hosts_not_this_roles(tmp_path):
    # A host that served as the primary and rejoins as the backup (its sync
    # address is the config's primary one: the daemon swapped the roles).
    d = _daemon(tmp_path, "primary")
    first = d._claim_epoch()
    swapped = _daemon(tmp_path, "backup")
    swapped.cfg = swapped.cfg.swapped()
    assert swapped.cfg.own_addresses("backup")[0] == "10.78.0.1"
    (tmp_path / "epoch-10.78.0.1").write_text("%d\n" % (first + HOUR_NS))
    assert swapped._claim_epoch() == first + HOUR_NS + 1


def test_an_unreadable_or_unwritable_file_costs_the_guarantee_not_the_daemon(tmp_path):
    for garbage in (b"not a number\n", b"\xff\xfe", b"-5\n", b"%d\n" % (1 << 64)):
        (tmp_path / "epoch-10.78.0.2").write_bytes(garbage)
        before = time.time_ns()
        with capture_logs() as logs:
            epoch = _daemon(tmp_path)._claim_epoch()
        assert [e["event"] for e in logs] == ["epoch_file_unreadable"], (garbage, logs)
        assert before <= epoch <= time.time_ns(), garbage  # from the clock
        assert int((tmp_path / "epoch-10.78.0.2").read_text()) == epoch  # and kept, replacing the garbage
    blocked = tmp_path / "file"
    blocked.write_text("")
    before = time.time_ns()
    with capture_logs() as logs:
        epoch = _daemon(blocked / "state")._claim_epoch()  # a directory inside a file: ENOTDIR
    assert before <= epoch <= time.time_ns()
    assert [(e["event"], e["log_level"]) for e in logs] == [("epoch_file_unreadable", "warning"),
                                                            ("epoch_not_kept", "warning")]
    assert not os.path.exists(blocked / "state")


def test_an_epoch_path_that_is_a_directory_leaves_nothing_behind(tmp_path):
    (tmp_path / "epoch-10.78.0.2").mkdir()
    before = time.time_ns()
    epoch = _daemon(tmp_path)._claim_epoch()
    assert before <= epoch <= time.time_ns()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-10.78.0.2"]  # no tmp file left


def test_a_fifo_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "epoch-10.78.0.2")  # open() would block for ever
    with capture_logs() as logs:
        _daemon(tmp_path)._claim_epoch()
    assert logs[0]["event"] == "epoch_file_unreadable" and "regular" in logs[0]["error"]


def test_a_state_dir_others_can_write_is_not_written(tmp_path):
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with capture_logs() as logs:
        _daemon(open_dir)._claim_epoch()
    assert logs[0]["event"] == "epoch_not_kept" and "writable by others" in logs[0]["error"]
    assert list(open_dir.iterdir()) == []


def test_an_epoch_ahead_of_the_clock_that_cannot_be_kept_is_an_error(tmp_path):
    # The file keeps the last life's epoch: the next start would repeat this one.
    (tmp_path / "epoch-10.78.0.2").write_text("%d\n" % (time.time_ns() + HOUR_NS))
    os.chmod(tmp_path, 0o777)  # (refused as unsafe: the write fails)
    with capture_logs() as logs:
        _daemon(tmp_path)._claim_epoch()
    assert [(e["event"], e["log_level"]) for e in logs] == [("clock_behind_last_epoch", "warning"),
                                                            ("epoch_not_kept", "error")]


def test_setup_claims_the_epoch_after_the_roles_are_swapped(tmp_path, monkeypatch):
    # _setup's order: the host check (which may swap the roles), then the
    # epoch, then the first socket. Stopped at the first socket.
    d = _daemon(tmp_path, "backup")

    def swap():
        d.cfg = d.cfg.swapped()

    class Stop(Exception):
        pass

    def no_socket(*a, **k):
        raise Stop

    d._check_host = swap
    d._prepare_garp = lambda: None
    monkeypatch.setattr(driver.socket, "socket", no_socket)
    with pytest.raises(Stop):
        d._setup()
    assert (tmp_path / "epoch-10.78.0.1").exists() and not (tmp_path / "epoch-10.78.0.2").exists()
    assert int((tmp_path / "epoch-10.78.0.1").read_text()) == d.epoch
