"""The lab's life cycle, the rule scripts, and the daemons' rule handling."""

import os
import signal
import subprocess
import sys
import time

import pytest

from nfq_sttcp import lab

from .test_errors import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "nfq_sttcp"]
SCRATCH = "sttcp-rules-test"


def run(*argv, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    return r


def test_lab_lifecycle_status_exec_and_idempotent_down(make_lab):
    lab.down(quiet=True)  # nothing there: harmless
    make_lab()
    assert set(lab.namespaces()) == {lab.NS_CLIENT, lab.NS_PRIMARY, lab.NS_BACKUP, lab.NS_LAN, lab.NS_SYNC}
    st = lab.status()
    assert st["vip_owner"] == ["primary"]
    assert st["daemons"]["backup"]["state"] == "following"
    assert st["daemons"]["primary"]["backup"] == "present"
    tee = run("iptables", "-w", "-t", "mangle", "-S", "STTCP-TEE", ns=lab.NS_PRIMARY).stdout
    assert "TEE --gateway 10.78.0.2" in tee, "the primary clones to a following backup"
    r = run(*CLI, "lab", "exec", "client", "--", "sh", "-c", "exit 7", check=False)
    assert r.returncode == 7, "lab exec passes the exit code through"
    r = run(*CLI, "lab", "exec", "client", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert "10.77.0.10/24" in r.stdout
    for host, mtu_if in (("client", "eth0"), ("primary", "lan0"), ("primary", "sync0"), ("backup", "lan0")):
        r = run("ip", "-o", "link", "show", "dev", mtu_if, ns=lab.HOSTS[host])
        assert " mtu 1500 " in r.stdout
    tsp = run("sysctl", "-n", "net.ipv4.tcp_timestamps", ns=lab.NS_PRIMARY).stdout.strip()
    tsb = run("sysctl", "-n", "net.ipv4.tcp_timestamps", ns=lab.NS_BACKUP).stdout.strip()
    assert tsp != tsb, "primary and backup must not share a timestamp clock (trap 6)"
    r = run(*CLI, "lab", "status")
    assert "VIP 10.77.0.100 owned by: primary" in r.stdout
    r = run(*CLI, "lab", "up", check=False)
    assert r.returncode != 0 and "already up" in r.stderr
    run(*CLI, "lab", "down")
    assert lab.namespaces() == []
    r = run(*CLI, "lab", "down")
    assert "nothing" in r.stdout
    make_lab()  # up works again after down
    assert lab.status()["daemons"]["backup"]["state"] == "following"


def test_the_backup_runs_reno_without_route_metrics_on_a_machine_that_restricts_it(make_lab):
    """A namespace may choose as its default only an algorithm in the
    machine's allowed list, which on a fresh machine holds only the default
    and reno: the backup's reno needs no change to it. Its stack saves no
    route metrics (doctor.BACKUP_CC); the client's and primary's keep the
    machine's defaults, so plain TCP is measured as before."""
    path = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
    original = open(path).read().strip()
    default = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
    fresh = " ".join(dict.fromkeys(["reno", default]))  # (what a fresh machine allows)
    with open(path, "w") as f:
        f.write(fresh)

    def metrics_saved(host: str) -> str:
        return lab.sh("sysctl", "-n", "net.ipv4.tcp_no_metrics_save", ns=lab.HOSTS[host]).stdout.strip()

    try:
        make_lab()
        assert lab.congestion_controls()["backup"] == "reno"
        assert metrics_saved("backup") == "1"
        assert lab.congestion_controls()["client"] == default, "only the backup's is changed"
        assert lab.congestion_controls()["primary"] == default
        assert open(path).read().strip() == fresh, "reno is always allowed: the machine's list stays"
        lab.crash("primary")
        lab.reboot("primary")  # a crashed primary comes back with the backup's settings
        assert lab.congestion_controls()["primary"] == "reno"
        assert metrics_saved("primary") == "1"
        lab.down(quiet=True)
        assert open(path).read().strip() == fresh
    finally:
        lab.down(quiet=True)  # (first: after a failure, it would put back the list set above)
        with open(path, "w") as f:
            f.write(original)


def test_crash_silences_the_primary(make_lab):
    make_lab()
    lab.crash("primary")
    assert run("ip", "netns", "pids", lab.NS_PRIMARY).stdout.strip() == ""
    deadline = time.monotonic() + 5
    while lab.status()["daemons"]["backup"]["state"] != "active" and time.monotonic() < deadline:
        time.sleep(0.05)
    st = lab.status()
    assert st["daemons"]["backup"]["state"] == "active"
    assert st["vip_owner"] == ["backup"]
    assert st["daemons"]["primary"]["state"] == "down"


def test_primary_clones_only_while_a_backup_follows(make_lab):
    make_lab(start_backup=False)
    tee = run("iptables", "-w", "-t", "mangle", "-S", "STTCP-TEE", ns=lab.NS_PRIMARY).stdout
    assert "TEE" not in tee.replace("STTCP-TEE", ""), "no clones to a backup host without its daemon"
    # a connection works: the backup's stack, with no daemon, never sees a clone to answer
    r = run("python3", "-c", "import socket; s=socket.create_connection(('10.77.0.100',7003),timeout=5); "
            "print(s.recv(100).decode())", ns=lab.NS_CLIENT)
    assert r.stdout.startswith("220 ")
    lab.start_backup_daemon(progress=lambda *_: None)
    tee = run("iptables", "-w", "-t", "mangle", "-S", "STTCP-TEE", ns=lab.NS_PRIMARY).stdout
    assert "TEE --gateway" in tee


@pytest.fixture
def scratch_ns():
    subprocess.run(["ip", "netns", "del", SCRATCH], capture_output=True)
    run("ip", "netns", "add", SCRATCH)
    run("ip", "link", "set", "lo", "up", ns=SCRATCH)
    for addr in (lab.PRIMARY_SYNC, lab.BACKUP_SYNC):  # a daemon refuses a host without its sync address
        run("ip", "addr", "add", addr + "/32", "dev", "lo", ns=SCRATCH)
    # rules that were there before us
    run("iptables", "-w", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "53", "-j", "ACCEPT", ns=SCRATCH)
    run("iptables", "-w", "-t", "raw", "-A", "PREROUTING", "-p", "icmp", "-j", "ACCEPT", ns=SCRATCH)
    run("iptables", "-w", "-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "--dport", "22", "-j", "ACCEPT", ns=SCRATCH)
    try:
        yield SCRATCH
    finally:
        subprocess.run(["ip", "netns", "pids", SCRATCH], capture_output=True)
        for pid in subprocess.run(["ip", "netns", "pids", SCRATCH], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", SCRATCH], capture_output=True)


def saved(ns):
    out = run("iptables-save", ns=ns).stdout
    return [l for l in out.splitlines() if not l.startswith("#")]


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_scripts_apply_twice_remove_twice_and_keep_other_rules(scratch_ns, role):
    before = saved(scratch_ns)
    for _ in range(2):
        run(os.path.join(ROOT, "iptables", "apply"), role, ns=scratch_ns)
    during = saved(scratch_ns)
    assert sum("-j STTCP-" in l for l in during) == (2 if role == "primary" else 2), during
    assert all(l in during for l in before), "apply must not disturb existing rules"
    for _ in range(2):
        run(os.path.join(ROOT, "iptables", "remove"), role, ns=scratch_ns)
    assert saved(scratch_ns) == before
    assert "usage" in run(os.path.join(ROOT, "iptables", "apply"), "--help").stdout


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_cli_rules_apply_show_remove(scratch_ns, role, tmp_path):
    conf = write_config(tmp_path)
    before = saved(scratch_ns)
    run(*CLI, "rules", "apply", "--role", role, "--config", conf, ns=scratch_ns)
    run(*CLI, "rules", "apply", "--role", role, "--config", conf, ns=scratch_ns)
    shown = run(*CLI, "rules", "show", "--role", role, "--config", conf, ns=scratch_ns).stdout
    assert "NFQUEUE" in shown
    assert sum("-j STTCP-" in l for l in saved(scratch_ns)) == 2
    run(*CLI, "rules", "remove", "--role", role, "--config", conf, ns=scratch_ns)
    run(*CLI, "rules", "remove", "--role", role, "--config", conf, ns=scratch_ns)
    assert saved(scratch_ns) == before
    run(*CLI, "rules", "apply", "--role", role, "--config", conf, ns=scratch_ns)
    run(*CLI, "cleanup", "--config", conf, ns=scratch_ns)
    assert saved(scratch_ns) == before


def _start_daemon(role, conf, ns, tmp_path):
    log = open(tmp_path / ("%s.log" % role), "w")
    p = subprocess.Popen(["ip", "netns", "exec", ns] + CLI + ["--log-format", "json", role, "--config", conf],
                         stdout=log, stderr=subprocess.STDOUT)
    sock = tmp_path / "ctl" / ("%s.sock" % role)
    deadline = time.monotonic() + 15
    while not sock.exists() or sum("-j STTCP-" in l for l in saved(ns)) < 2:
        assert p.poll() is None, (tmp_path / ("%s.log" % role)).read_text()
        assert time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.05)
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_primary_daemon_removes_its_rules_on_the_way_out(scratch_ns, tmp_path, sig):
    conf = write_config(tmp_path)
    run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p", ns=scratch_ns)
    before = saved(scratch_ns)
    p = _start_daemon("primary", conf, scratch_ns, tmp_path)
    p.send_signal(sig)
    assert p.wait(10) == 0
    assert saved(scratch_ns) == before


def test_backup_daemon_stays_fenced_after_exit_until_removed(scratch_ns, tmp_path):
    conf = write_config(tmp_path)
    run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p", ns=scratch_ns)
    run("ip", "link", "set", "lan0", "up", ns=scratch_ns)
    before = saved(scratch_ns)
    p = _start_daemon("backup", conf, scratch_ns, tmp_path)
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    after = saved(scratch_ns)
    assert any("-j DROP" in l and "STTCP-BOUT" in l for l in after), after
    assert not any("NFQUEUE" in l for l in after)
    run(*CLI, "rules", "remove", "--role", "backup", "--config", conf, ns=scratch_ns)
    assert saved(scratch_ns) == before


def test_daemon_refuses_a_missing_interface_and_a_busy_queue(scratch_ns, tmp_path):
    conf = write_config(tmp_path)
    r = run(*CLI, "backup", "--config", conf, ns=scratch_ns, check=False)
    assert r.returncode == 1 and "LAN interface lan0 does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p", ns=scratch_ns)
    p = _start_daemon("primary", conf, scratch_ns, tmp_path)
    try:
        conf2 = tmp_path / "second.toml"
        conf2.write_text(open(conf).read().replace(str(tmp_path / "ctl"), str(tmp_path / "ctl2"))
                         .replace("port = 7788", "port = 7789"))
        r = run(*CLI, "primary", "--config", str(conf2), ns=scratch_ns, check=False)
        assert r.returncode == 1 and "NFQUEUE 11" in r.stderr, r.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


def test_a_cut_sync_link_alone_is_no_crash_and_stalls_nothing(make_lab):
    """The LAN heartbeat path keeps the backup from taking over while the
    primary lives; the primary, no longer hearing the backup on the sync
    link (where the clones go), drops protection instead of stalling clients."""
    make_lab()
    p = subprocess.Popen(["ip", "netns", "exec", lab.NS_CLIENT, sys.executable, "-c", """
import socket, sys, time
s = socket.create_connection(("10.77.0.100", 7000), timeout=5)
for i in range(40):
    msg = b"%04d" % i * 250
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        got += s.recv(65536)
    assert got == msg
    if i == 10:
        print("CUT", flush=True); sys.stdin.readline()
    time.sleep(0.05)
print("DONE", flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "CUT"
    run("ip", "link", "set", "ps0", "down", ns=lab.NS_SYNC)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "DONE"
    assert p.wait(30) == 0
    st = lab.status()
    assert st["vip_owner"] == ["primary"], "two owners, or a takeover while the primary lives"
    assert st["daemons"]["backup"]["state"] in ("following", "suspect")
    assert st["daemons"]["primary"]["backup"] == "absent"
    assert all(not c["protected"] for c in st["daemons"]["primary"]["connections"])


def _affinities(ns):
    """The CPU set of every thread of every process in a namespace."""
    out = {}
    for pid in run("ip", "netns", "pids", ns).stdout.split():
        try:
            for tid in os.listdir("/proc/%s/task" % pid):
                out[int(tid)] = os.sched_getaffinity(int(tid))
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile (the test server's, per connection)
    return out


def test_lab_place_puts_each_server_host_on_cpus_of_its_own(make_lab):
    cpus = os.sched_getaffinity(0)
    make_lab()
    if len(cpus) < 2:
        r = run(*CLI, "lab", "place", check=False)
        assert r.returncode == 1 and "needs two CPUs" in r.stderr
        return
    client = subprocess.Popen(["ip", "netns", "exec", lab.NS_CLIENT, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while not _affinities(lab.NS_CLIENT) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _affinities(lab.NS_CLIENT), "the client's process did not start"
        r = run(*CLI, "lab", "place")
        client_cpus = _affinities(lab.NS_CLIENT)
    finally:
        client.kill()
        client.wait()
    assert client_cpus and all(a == cpus for a in client_cpus.values())  # the client stays free
    primary, backup = _affinities(lab.NS_PRIMARY), _affinities(lab.NS_BACKUP)
    assert len(primary) >= 3 and len(backup) >= 3  # application and daemon, the daemon's threads
    p_cpus, b_cpus = set().union(*primary.values()), set().union(*backup.values())
    assert all(a == p_cpus for a in primary.values()) and all(a == b_cpus for a in backup.values())
    assert p_cpus and b_cpus and not p_cpus & b_cpus and p_cpus | b_cpus == cpus
    assert "primary on CPU %s" % ",".join(map(str, sorted(p_cpus))) in r.stdout
    # The pair still serves, and protects, while placed.
    r = run(*CLI, "lab", "exec", "client", "--", "python3", "-c",
            "import socket; s=socket.create_connection(('10.77.0.100',7000),timeout=5); s.sendall(b'placed'); "
            "print(s.recv(16).decode())")
    assert r.stdout.strip() == "placed"
    assert lab.status()["daemons"]["backup"]["state"] == "following"
    run(*CLI, "lab", "place", "--shared")
    assert all(a == cpus for ns in (lab.NS_PRIMARY, lab.NS_BACKUP) for a in _affinities(ns).values())


def test_cleanup_removes_only_the_clsact_qdiscs_a_daemon_of_ours_added(scratch_ns, tmp_path):
    """A qdisc is ours to remove only if our file names this very link (this
    namespace, this index) and nobody else's filter is on it."""
    conf = write_config(tmp_path)
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    for a, b in (("va", "vb"), ("vc", "vd")):
        run("ip", "link", "add", a, "type", "veth", "peer", "name", b, ns=scratch_ns)
    for dev in ("va", "vb", "vc", "vd"):
        run("tc", "qdisc", "add", "dev", dev, "clsact", ns=scratch_ns)

    def mark(dev):  # as the daemon marks a qdisc it added
        run(sys.executable, "-c", "from nfq_sttcp import firewall as f; f._write_marker(f.qdisc_marker(%r, %r), %r)"
            % (str(ctl), dev, dev), ns=scratch_ns)
        assert (ctl / ("clsact-" + dev)).read_text().startswith("netns ")

    mark("va")  # ours, but someone has put a filter on it since
    run("tc", "filter", "add", "dev", "va", "ingress", "pref", "9", "bpf", "bytecode", "1,6 0 0 0,", ns=scratch_ns)
    mark("vb")  # ours, empty: goes
    (ctl / "clsact-vc").write_text("netns 1 ifindex 1\n")  # a file for another namespace's vc
    # vd: no file at all
    run(*CLI, "cleanup", "--config", conf, ns=scratch_ns)
    shown = {dev: run("tc", "qdisc", "show", "dev", dev, ns=scratch_ns).stdout for dev in ("va", "vb", "vc", "vd")}
    assert "clsact" not in shown["vb"] and not (ctl / "clsact-vb").exists()
    for dev in ("va", "vc", "vd"):
        assert "clsact" in shown[dev], (dev, shown[dev])
    assert (ctl / "clsact-va").exists() and (ctl / "clsact-vc").exists()
    assert "pref 9" in run("tc", "filter", "show", "dev", "va", "ingress", ns=scratch_ns).stdout
