"""What CI can check of the real-host path: the Vagrantfile, the provisioning
script, the configs it writes, the systemd units, and the rule scripts."""

import os
import pathlib
import shutil
import subprocess

import pytest

from nfq_sttcp import config, rules

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ["vagrant/provision.sh", "iptables/apply", "iptables/remove", "iptables/settings.sh",
           "scripts/bootstrap.sh", ".ci/run"]
SETTINGS = {"STTCP_VIP": "192.168.77.100", "STTCP_PORTS": "7000,7001,7002,7003", "STTCP_LAN_PREFIX": "24",
            "STTCP_PRIMARY_LAN": "192.168.77.11", "STTCP_BACKUP_LAN": "192.168.77.12",
            "STTCP_PRIMARY_SYNC": "192.168.78.11", "STTCP_BACKUP_SYNC": "192.168.78.12"}


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail("%s is missing: 'make test' installs it (scripts/bootstrap.sh dev)" % tool, pytrace=False)


def test_vagrantfile_validates_without_a_provider():
    need("vagrant")
    key = ROOT / "vagrant" / ".sync.key"
    had_key = key.exists()
    try:
        r = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT / "vagrant",
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        for env in ({"STTCP_CLIENT_VM": "1"}, {"STTCP_LAN_NET": "10.99.1"}):
            r = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT / "vagrant",
                               capture_output=True, text=True, timeout=300, env={**os.environ, **env})
            assert r.returncode == 0, r.stdout + r.stderr
        assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    finally:
        if not had_key and key.exists():
            key.unlink()


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    need("shellcheck")
    path = ROOT / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    r = subprocess.run(["shellcheck", "-x", "-P", str(path.parent), str(path)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout


def render_role(tmp_path, role, lan_if="eth1"):
    etc = tmp_path / role / "etc"
    units = tmp_path / role / "units"
    etc.mkdir(parents=True)
    units.mkdir(parents=True)
    (etc / "sync.key").write_text("0123456789abcdef0123456789abcdef\n")
    os.chmod(etc / "sync.key", 0o600)
    env = {**os.environ, **SETTINGS, "STTCP_RENDER_ONLY": "1", "STTCP_SRC": str(ROOT), "STTCP_ETC": str(etc),
           "STTCP_UNITS": str(units), "STTCP_LAN_IF": lan_if}
    for _ in range(2):  # a second run changes nothing
        before = {p: p.read_bytes() for p in list(etc.iterdir()) + list(units.iterdir())}
        r = subprocess.run(["bash", str(ROOT / "vagrant" / "provision.sh"), role], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    after = {p: p.read_bytes() for p in list(etc.iterdir()) + list(units.iterdir())}
    assert before == after
    return etc, units


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_provisioned_configs_pass_validation(tmp_path, role):
    etc, _ = render_role(tmp_path, role)
    cfg = config.load(str(etc / "config.toml"))
    assert cfg.vip == "192.168.77.100" and cfg.lan_interface == "eth1" and cfg.read_key()
    assert cfg.peer_addresses(role) == (["192.168.78.12", "192.168.77.12"] if role == "primary"
                                        else ["192.168.78.11", "192.168.77.11"])
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "nfq-sttcp") if (ROOT / ".venv").exists() else "nfq-sttcp",
                        "config", "check", "--config", str(etc / "config.toml")], capture_output=True, text=True)
    assert r.returncode == 0 and "valid" in r.stdout, r.stderr


def test_systemd_units_verify(tmp_path):
    need("systemd-analyze")
    _, units = render_role(tmp_path, "primary")
    files = sorted(str(p) for p in units.iterdir())
    assert len(files) == 3
    r = subprocess.run(["systemd-analyze", "verify"] + files, capture_output=True, text=True)
    problems = [l for l in (r.stdout + r.stderr).splitlines() if "nfq-sttcp" in l and "ignoring" not in l.lower()]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.parametrize("ports", ["7000", "7000,7001,7002,7003", ",".join(str(p) for p in range(9000, 9040))])
@pytest.mark.parametrize("role", ["primary", "backup"])
def test_bash_and_python_render_the_same_rules(role, ports):
    d = {"vip": "192.168.5.9", "ports": [int(p) for p in ports.split(",")], "lan_interface": "ens4",
         "sync": {"primary": "172.16.0.1", "backup": "172.16.0.2"}, "mark": 4660, "chain_prefix": "HA2",
         "queues": {"primary_out": 3, "backup_in": 4, "backup_out": 5}}
    cfg = config.from_dict(d)
    r = subprocess.run([str(ROOT / "iptables" / "apply"), role, "--print", "VIP=192.168.5.9", "PORTS=" + ports,
                        "LAN_IF=ens4", "BACKUP_SYNC=172.16.0.2", "MARK=4660", "CHAIN_PREFIX=HA2",
                        "QUEUE_PRIMARY_OUT=3", "QUEUE_BACKUP_IN=4", "QUEUE_BACKUP_OUT=5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    strip = lambda t: [l for l in t.splitlines() if not l.startswith("#")]
    assert strip(r.stdout) == strip(rules.render(cfg, role))


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_bash_removes_the_chains_python_knows(role):
    """iptables/remove tears down what rules.hooks lists, the fast path's
    -PIN chain included (a killed daemon leaves it)."""
    cfg = config.from_dict({"vip": "192.168.5.9", "ports": [7000], "lan_interface": "ens4",
                            "sync": {"primary": "172.16.0.1", "backup": "172.16.0.2"}, "chain_prefix": "HA2"})
    r = subprocess.run(["bash", "-c", '. "$0/iptables/settings.sh" && CHAIN_PREFIX=HA2 && sttcp_chains "$1"',
                        str(ROOT), role], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == ["%s %s %s" % (h.table, h.builtin, h.chain) for h in rules.hooks(cfg, role)]


def test_rule_scripts_reject_bad_settings():
    r = subprocess.run([str(ROOT / "iptables" / "apply"), "primary", "--print", "VIP=nonsense"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not an IPv4 address" in r.stderr
    r = subprocess.run([str(ROOT / "iptables" / "remove"), "primary", "COLOUR=blue"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown setting" in r.stderr
    r = subprocess.run([str(ROOT / "iptables" / "apply")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
