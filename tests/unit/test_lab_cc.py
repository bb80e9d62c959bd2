"""The lab's change to the machine's allowed congestion controls, and its
undoing, on files standing in for /proc (pure file I/O, no root)."""

import pytest

from nfq_sttcp import lab


@pytest.fixture
def proc(tmp_path, monkeypatch):
    (tmp_path / "tcp_available_congestion_control").write_text("reno bbr cubic\n")
    (tmp_path / "tcp_allowed_congestion_control").write_text("reno bbr\n")
    monkeypatch.setattr(lab, "_CC_PROC", str(tmp_path / "tcp_%s_congestion_control"))
    monkeypatch.setattr(lab, "_ALLOWED_SAVED", str(tmp_path / "allowed_cc"))
    return tmp_path


def allowed(proc):
    return (proc / "tcp_allowed_congestion_control").read_text().split()


def test_the_lab_adds_its_algorithm_and_down_takes_it_out_again(proc):
    assert lab._allow_in_namespaces("cubic")
    assert allowed(proc) == ["reno", "bbr", "cubic"]
    assert lab._allow_in_namespaces("cubic")  # a second up changes nothing
    assert allowed(proc) == ["reno", "bbr", "cubic"]
    lab._restore_allowed_cc()
    assert allowed(proc) == ["reno", "bbr"]
    assert not (proc / "allowed_cc").exists()


def test_an_admins_change_made_while_the_lab_was_up_stays(proc):
    lab._allow_in_namespaces("cubic")
    (proc / "tcp_allowed_congestion_control").write_text("reno bbr cubic dctcp\n")
    lab._restore_allowed_cc()
    assert allowed(proc) == ["reno", "bbr", "dctcp"]


def test_an_algorithm_allowed_before_is_left_allowed(proc):
    (proc / "tcp_allowed_congestion_control").write_text("reno cubic\n")
    assert lab._allow_in_namespaces("cubic")
    lab._restore_allowed_cc()
    assert allowed(proc) == ["reno", "cubic"]


def test_a_failed_restore_keeps_the_record_for_the_next_down(proc, monkeypatch, capsys):
    lab._allow_in_namespaces("cubic")
    real_open = open

    def refusing(path, mode="r", *a, **kw):
        if "w" in mode and path.endswith("tcp_allowed_congestion_control"):
            raise PermissionError(1, "Operation not permitted")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", refusing)
    lab._restore_allowed_cc()
    assert "could not take cubic out" in capsys.readouterr().err
    assert (proc / "allowed_cc").exists()
    monkeypatch.setattr("builtins.open", real_open)
    lab._restore_allowed_cc()
    assert allowed(proc) == ["reno", "bbr"]
    assert not (proc / "allowed_cc").exists()


def test_a_kernel_without_the_algorithm_is_left_alone(proc, monkeypatch):
    monkeypatch.setattr(lab, "sh", lambda *a, **kw: None)  # no modprobe
    assert not lab._allow_in_namespaces("dctcp")
    assert allowed(proc) == ["reno", "bbr"]
    assert not (proc / "allowed_cc").exists()
