"""Namespace end-to-end tests: real namespaces, iptables, NFQUEUE and sockets.

They need root. Without it they fail (never skip): a skipped end-to-end test
would let a broken tree look green.
"""

import os
import shutil
import subprocess

import pytest

from nfq_sttcp import lab


def _require(cond, what):
    if not cond:
        pytest.fail("namespace tests need %s (run them as root through 'make test')" % what, pytrace=False)


def _lab_processes():
    """Live processes of ours (zombies excluded), with their command lines."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "nfq_sttcp" in cmd and "pytest" not in cmd:
            found[int(pid)] = cmd.strip()
    return found


@pytest.fixture(autouse=True)
def clean_machine():
    """Every test starts and ends with no sttcp- namespace, process or chain.
    So it takes down a lab already running: a demo or a `make bench` in
    progress on this machine is stopped by the first netns test."""
    _require(os.geteuid() == 0, "root")
    for tool in ("ip", "iptables", "iptables-restore", "tcpdump", "ss"):
        _require(shutil.which(tool), tool)
    lab.down(quiet=True)
    before = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    allowed = _allowed_cc()
    yield
    left = lab.namespaces()
    lab.down(quiet=True)
    assert not left, "test left namespaces behind: %s" % left
    procs = _lab_processes()
    assert not procs, "test left processes behind: %s" % procs
    after = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    strip = lambda t: [l for l in t.splitlines() if not l.startswith("#")]
    assert strip(before) == strip(after), "the root namespace's rules changed"
    assert _allowed_cc() == allowed, "the machine's tcp_allowed_congestion_control changed"


def _allowed_cc():
    with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
        return f.read().split()


@pytest.fixture
def make_lab(tmp_path, monkeypatch):
    """Bring the lab up with the given options; always brought down, its
    daemon and application logs kept under the test's tmp_path."""
    monkeypatch.setenv("STTCP_LAB_KEEP_LOGS", str(tmp_path / "lab-logs"))
    print("lab logs kept in", tmp_path / "lab-logs")
    made = []

    def up(**kw):
        cfg = lab.up(progress=lambda *_: None, **kw)
        made.append(cfg)
        return cfg

    yield up
    lab.down(quiet=True)
