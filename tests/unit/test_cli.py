import argparse
import subprocess
import sys

CLI = [sys.executable, "-m", "nfq_sttcp"]


def test_bad_config_is_one_clear_line_and_exit_2(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text('vip = "10.77.0.100"\nports = [7000]\nlan_interface = "lan0"\n[sync]\nprimary = "10.78.0.1"\n')
    r = subprocess.run(CLI + ["primary", "--config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "nfq-sttcp: config error: missing required key(s): sync.backup"


def test_unreadable_config(tmp_path):
    r = subprocess.run(CLI + ["backup", "--config", str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot read config" in r.stderr and "Traceback" not in r.stderr


def test_rules_render_needs_no_privilege(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('vip = "10.77.0.100"\nports = [7000]\nlan_interface = "lan0"\n'
                    '[sync]\nprimary = "10.78.0.1"\nbackup = "10.78.0.2"\n')
    r = subprocess.run(CLI + ["rules", "render", "--role", "backup", "--config", str(conf)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "NFQUEUE --queue-num 12" in r.stdout


def test_missing_kernel_features_are_named():
    from nfq_sttcp.firewall import explain_restore_error
    msg = explain_restore_error("iptables-restore v1.8.9 (nf_tables): Couldn't load target `TEE':No such file or directory\n")
    assert msg.startswith("the kernel lacks the TEE target (CONFIG_NETFILTER_XT_TARGET_TEE)")
    assert "NFQUEUE" in explain_restore_error("Couldn't load target `NFQUEUE':No such file or directory")
    assert "run as root" in explain_restore_error("iptables-restore: Permission denied (you must be root)")


def _switchover_with(monkeypatch, tmp_path, capsys, request, switchover=None):
    from nfq_sttcp import cli, control
    conf = tmp_path / "c.toml"
    conf.write_text('vip = "10.77.0.100"\nports = [7000]\nlan_interface = "lan0"\n'
                    '[sync]\nprimary = "10.78.0.1"\nbackup = "10.78.0.2"\n')
    monkeypatch.setattr(control, "request", request)
    if switchover is not None:
        monkeypatch.setattr(control, "switchover", switchover)
    # (_switchover itself: main() would point structlog at capsys's stream,
    # which later tests would find closed)
    rc = cli._switchover(argparse.Namespace(config=str(conf), control_socket=None))
    return rc, capsys.readouterr().err


def test_switchover_without_the_right_to_the_socket_says_so(monkeypatch, tmp_path, capsys):
    def request(path, *a, **k):
        raise PermissionError(13, "Permission denied")
    rc, err = _switchover_with(monkeypatch, tmp_path, capsys, request)
    assert rc == 1 and "switchover needs root" in err and "no daemon" not in err


def test_switchover_with_no_daemon_names_the_sockets(monkeypatch, tmp_path, capsys):
    def request(path, *a, **k):
        raise FileNotFoundError(2, "No such file or directory")
    rc, err = _switchover_with(monkeypatch, tmp_path, capsys, request)
    assert rc == 3 and "no daemon serving the VIP answers here" in err


def test_a_daemon_that_stops_answering_mid_switchover_is_one_clear_line(monkeypatch, tmp_path, capsys):
    def request(path, *a, **k):
        return {"role": "primary", "serving_as": "primary", "state": "serving"}

    def switchover(path, *a, **k):
        raise ConnectionResetError(104, "Connection reset by peer")
    from nfq_sttcp import control
    monkeypatch.setattr(control, "serves", lambda st: True)
    rc, err = _switchover_with(monkeypatch, tmp_path, capsys, request, switchover)
    assert rc == 1 and "stopped answering" in err and "Traceback" not in err
