"""Start-up errors: one clear line and a non-zero exit, never a traceback."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from nfq_sttcp import config, lab

from .checks import big_tcp

CLI = [sys.executable, "-m", "nfq_sttcp"]
NS = "sttcp-errors-test"


@pytest.fixture
def ns():
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
    try:
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def write_config(tmp_path, with_key=True):
    cfg = lab.lab_config()
    text = config.render_toml(cfg).replace(cfg.control_socket_dir, str(tmp_path / "ctl"))
    # Nothing of a test's daemon in the lab's directory: its epoch file too.
    text = text.replace('state_dir = "%s"' % cfg.state_dir, 'state_dir = "%s"' % (tmp_path / "state"))
    if with_key:
        key = tmp_path / "sync.key"
        key.write_text("0123456789abcdef0123456789abcdef\n")
        os.chmod(key, 0o600)
        text = text.replace(cfg.sync_key_file, str(key))
    else:
        text = text.replace('key_file = "%s"\n' % cfg.sync_key_file, "")
    p = tmp_path / "c.toml"
    p.write_text(text)
    os.chmod(tmp_path, 0o755)
    os.chmod(p, 0o644)
    return str(p)


def daemon(ns, *args):
    r = subprocess.run(["ip", "netns", "exec", ns] + CLI + list(args), capture_output=True, text=True, timeout=30)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode != 0
    return r.stderr.strip()


def test_refuses_to_run_without_a_key(ns, tmp_path):
    err = daemon(ns, "primary", "--config", write_config(tmp_path, with_key=False))
    assert "no sync.key_file" in err and "--insecure-no-auth" in err and len(err.splitlines()) == 1


def test_refuses_a_key_others_can_read(ns, tmp_path):
    conf = write_config(tmp_path)
    os.chmod(tmp_path / "sync.key", 0o644)
    assert "readable by group or others" in daemon(ns, "backup", "--config", conf)


def test_not_root(ns, tmp_path):
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed for this test")
    import tempfile
    with open(write_config(tmp_path, with_key=False)) as f:
        text = f.read()
    fd, conf = tempfile.mkstemp(prefix="sttcp-notroot-", suffix=".toml")  # readable by nobody
    os.write(fd, text.encode())
    os.close(fd)
    os.chmod(conf, 0o644)
    r = subprocess.run(["ip", "netns", "exec", ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
                       + CLI + ["primary", "--insecure-no-auth", "--config", conf],
                       capture_output=True, text=True, timeout=30)
    os.unlink(conf)
    assert r.returncode == 1 and r.stderr.strip() == \
        "nfq-sttcp: must run as root (needs CAP_NET_ADMIN for iptables and NFQUEUE)"


def test_missing_interface_and_vip_outside_the_lan(ns, tmp_path):
    conf = write_config(tmp_path)
    assert daemon(ns, "primary", "--config", conf) == "nfq-sttcp: LAN interface lan0 does not exist"
    subprocess.run(["ip", "-n", ns, "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "192.168.50.1/24", "dev", "lan0"], check=True)
    err = daemon(ns, "backup", "--config", conf)
    assert "VIP 10.77.0.100 is outside the LAN subnet" in err and "192.168.50.1" in err
    subprocess.run(["ip", "-n", ns, "addr", "flush", "dev", "lan0"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "10.77.0.1/24", "dev", "lan0"], check=True)
    err = daemon(ns, "backup", "--config", conf)
    assert err.startswith("nfq-sttcp: neither sync address is on this host (sync.backup = "), err


def test_links_that_carry_big_tcp_packets_are_refused(ns, tmp_path):
    conf = write_config(tmp_path)
    for name, addr in (("lan0", "10.77.0.1/24"), ("sync0", "10.78.0.1/24")):
        subprocess.run(["ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", name], check=True)
    big_tcp(ns, "lan0", 196608)
    err = daemon(ns, "primary", "--config", conf)
    assert "lan0 has gro_ipv4_max_size 196608, gso_ipv4_max_size 196608: BIG TCP" in err, err
    assert "fix: ip link set dev lan0 gso_ipv4_max_size 65536 gro_ipv4_max_size 65536" in err
    r = subprocess.run(["ip", "netns", "exec", ns] + CLI + ["doctor", "--config", conf, "--role", "primary", "--json"],
                       capture_output=True, text=True, timeout=120)
    bad = {f["what"]: f for f in json.loads(r.stdout)["findings"] if f["level"] == "fail"}
    assert r.returncode == 1 and "packet size lan0" in bad and "packet size sync0" not in bad, bad
    big_tcp(ns, "lan0", 65536)
    big_tcp(ns, "sync0", 131072)  # where the backup's clones arrive, and the primary's leave
    err = daemon(ns, "primary", "--config", conf)
    assert "sync0 has gro_ipv4_max_size 131072, gso_ipv4_max_size 131072: BIG TCP" in err, err
    # a link beneath: lan0's veth peer (here in the same namespace) sends what lan0 receives
    big_tcp(ns, "sync0", 65536)
    big_tcp(ns, "lan0p", 196608)
    err = daemon(ns, "primary", "--config", conf)
    assert "lan0p has gro_ipv4_max_size 196608, gso_ipv4_max_size 196608: BIG TCP" in err, err
