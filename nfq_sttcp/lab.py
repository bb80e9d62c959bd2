"""The namespace lab: a client, a primary and a backup on one kernel.

::

    sttcp-client (10.77.0.10) --eth0--+
                                      |  sttcp-lan: bridge br0 (LAN 10.77.0.0/24, VIP 10.77.0.100)
    sttcp-primary (10.77.0.1) --lan0--+
         | sync0 10.78.0.1            |
         |  sttcp-sync: bridge br1 (sync link 10.78.0.0/24)
         | sync0 10.78.0.2            |
    sttcp-backup  (10.77.0.2) --lan0--+

The sync link is a bridge too, so a test can attach a rogue host to it.

Every name starts with ``sttcp-``; nothing is routed out of the machine. The
primary and backup get different TCP timestamp clocks (``tcp_timestamps`` 1
vs 2) so the timestamp rewriting is really exercised (DESIGN.md trap 6).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

from . import config as config_mod
from . import control as control_mod
from . import doctor
from .config import Config

PREFIX = "sttcp-"
NS_CLIENT, NS_PRIMARY, NS_BACKUP, NS_LAN = "sttcp-client", "sttcp-primary", "sttcp-backup", "sttcp-lan"
NS_SYNC = "sttcp-sync"
HOSTS = {"client": NS_CLIENT, "primary": NS_PRIMARY, "backup": NS_BACKUP, "lan": NS_LAN, "sync": NS_SYNC}
CLIENT_IP, PRIMARY_IP, BACKUP_IP, VIP = "10.77.0.10", "10.77.0.1", "10.77.0.2", "10.77.0.100"
PRIMARY_SYNC, BACKUP_SYNC = "10.78.0.1", "10.78.0.2"
LAN_IF, SYNC_IF, CLIENT_IF = "lan0", "sync0", "eth0"
STATE_DIR = "/run/nfq-sttcp-lab"
DEFAULT_PORTS = (7000, 7001, 7002, 7003, 7004)


class LabError(RuntimeError):
    pass


def sh(*args: str, check: bool = True, ns: Optional[str] = None, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = list(args)
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise LabError("%s failed: %s" % (" ".join(cmd), (r.stderr or r.stdout).strip()))
    return r


def namespaces() -> list[str]:
    r = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(PREFIX)]


METRICS_PORT = 9477  # each daemon's Prometheus endpoint, on 127.0.0.1 in its own namespace


def lab_config(ports: tuple[int, ...] = DEFAULT_PORTS, interval_ms: int = 50, missed: int = 3,
               vip_owner: str = "builtin", fast_path: bool = False, max_lag_kb: int = 256,
               max_lag_ms: int = Config.max_backup_lag_ms, fast_inbound: bool = Config.fast_inbound) -> Config:
    return Config(vip=VIP, ports=ports, lan_interface=LAN_IF, primary_sync=PRIMARY_SYNC, backup_sync=BACKUP_SYNC,
                  primary_lan=PRIMARY_IP, backup_lan=BACKUP_IP, sync_key_file=os.path.join(STATE_DIR, "sync.key"),
                  heartbeat_interval_ms=interval_ms, heartbeat_missed=missed, metrics_port=METRICS_PORT, vip_owner=vip_owner,
                  control_socket_dir=os.path.join(STATE_DIR, "ctl"), state_dir=STATE_DIR, fast_path=fast_path, max_backup_lag_kb=max_lag_kb,
                  max_backup_lag_ms=max_lag_ms, fast_inbound=fast_inbound, source="nfq-sttcp lab")


def config_path() -> str:
    return os.path.join(STATE_DIR, "lab.toml")


def load_config() -> Config:
    if not os.path.exists(config_path()):
        raise LabError("the lab is not up (no %s): run 'nfq-sttcp lab up'" % config_path())
    return config_mod.load(config_path())


def attach(bridge_ns: str, bridge: str, port: str, host_ns: str, ifname: str) -> None:
    """A veth from ``host_ns`` (named ``ifname``) into a lab bridge (as ``port``)."""
    sh("ip", "-n", bridge_ns, "link", "add", port, "mtu", "1500", "type", "veth",
       "peer", "name", ifname, "mtu", "1500", "netns", host_ns)
    sh("ip", "link", "set", port, "master", bridge, ns=bridge_ns)
    sh("ip", "link", "set", port, "up", ns=bridge_ns)
    sh("ip", "link", "set", ifname, "up", ns=host_ns)


def _build_network() -> None:
    for ns in (NS_LAN, NS_SYNC, NS_CLIENT, NS_PRIMARY, NS_BACKUP):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    for bridge_ns, bridge in ((NS_LAN, "br0"), (NS_SYNC, "br1")):
        sh("ip", "link", "add", bridge, "type", "bridge", ns=bridge_ns)
        sh("ip", "link", "set", bridge, "up", ns=bridge_ns)
    for port, host, ifname in (("c0", NS_CLIENT, CLIENT_IF), ("p0", NS_PRIMARY, LAN_IF), ("b0", NS_BACKUP, LAN_IF)):
        attach(NS_LAN, "br0", port, host, ifname)
    for port, host in (("ps0", NS_PRIMARY), ("bs0", NS_BACKUP)):
        attach(NS_SYNC, "br1", port, host, SYNC_IF)
    sh("ip", "addr", "add", CLIENT_IP + "/24", "dev", CLIENT_IF, ns=NS_CLIENT)
    sh("ip", "addr", "add", PRIMARY_IP + "/24", "dev", LAN_IF, ns=NS_PRIMARY)
    sh("ip", "addr", "add", VIP + "/24", "dev", LAN_IF, ns=NS_PRIMARY)
    sh("ip", "addr", "add", PRIMARY_SYNC + "/24", "dev", SYNC_IF, ns=NS_PRIMARY)
    sh("ip", "addr", "add", BACKUP_IP + "/24", "dev", LAN_IF, ns=NS_BACKUP)
    sh("ip", "addr", "add", BACKUP_SYNC + "/24", "dev", SYNC_IF, ns=NS_BACKUP)
    sh("ip", "addr", "add", VIP + "/32", "dev", "lo", ns=NS_BACKUP)
    # Namespaces share one kernel: the same clock, and the same secret for
    # ISNs and timestamp offsets. Different tcp_timestamps modes make the two
    # TSval clocks differ (DESIGN.md trap 6). ISNs cannot be made to differ:
    # in the lab delta_seq is only a few thousand (the 64 ns clock between the
    # two SYN-ACKs); the unit tests cover large deltas and wraparound.
    sysctls = {
        NS_PRIMARY: {"net.ipv4.tcp_timestamps": "1"},
        # Offset-free clock on the backup: its TSvals differ from the primary's.
        NS_BACKUP: dict(_backup_sysctls(), **{"net.ipv4.tcp_timestamps": "2"}),
        # The benchmark opens tens of thousands of connections in a few
        # seconds, each leaving a port in TIME-WAIT for 60 s: with the default
        # 28,000 ports connect() slows to a crawl searching for a free one.
        NS_CLIENT: {"net.ipv4.tcp_timestamps": "1", "net.ipv4.ip_local_port_range": "1024 65535"},
    }
    for ns, kv in sysctls.items():
        _sysctls(ns, kv)


# A backup holds the VIP on lo: it must not answer ARP for it, and clones
# arrive on the sync link for an address on another interface.
# Its stack runs reno and saves no route metrics whatever the machine's
# defaults: bbr paces it, cubic's HyStart and a cached ssthresh keep its
# window small, and it then sets a slow pace for the pair (doctor.BACKUP_CC).
BACKUP_CC = doctor.BACKUP_CC
BACKUP_SYSCTLS = dict(doctor.backup_sysctls(LAN_IF, SYNC_IF), **{"net.ipv4.conf.default.rp_filter": "0"},
                      **doctor.BACKUP_TCP_SYSCTLS)
_CC_PROC = "/proc/sys/net/ipv4/tcp_%s_congestion_control"
_ALLOWED_SAVED = os.path.join(STATE_DIR, "allowed_cc")


def _allow_in_namespaces(cc: str) -> bool:
    """Let the lab's namespaces choose ``cc``; False when this kernel has no
    such algorithm.

    Trap: a namespace other than the first may set as its default only an
    algorithm in the machine's ``tcp_allowed_congestion_control``, else
    EPERM, and a fresh machine allows only its default and reno (this VM:
    "reno bbr"). The machine's list is widened here and put back by down()."""
    if cc not in _read(_CC_PROC % "available").split():
        # (The list names only algorithms loaded: a modular one is loaded
        # here, as a namespace's own sysctl would have done.)
        try:
            sh("modprobe", "tcp_" + cc, check=False, quiet=True)
        except OSError:
            pass  # no modprobe (a container): the kernel has what it has loaded
        if cc not in _read(_CC_PROC % "available").split():
            return False
    allowed = _read(_CC_PROC % "allowed").split()
    if cc not in allowed:
        # Remember what we added, not the whole list: down() then takes out
        # only that, and a change an admin made meanwhile stays.
        added = _read(_ALLOWED_SAVED).split() if os.path.exists(_ALLOWED_SAVED) else []
        with open(_ALLOWED_SAVED, "w") as f:
            f.write(" ".join(added + [cc]) + "\n")
        with open(_CC_PROC % "allowed", "w") as f:
            f.write(" ".join(allowed + [cc]))
    return True


def _backup_sysctls() -> dict[str, str]:
    """BACKUP_SYSCTLS, less the congestion control where the kernel lacks it
    (the backup then runs the default, which congestion_controls() shows)."""
    if _allow_in_namespaces(BACKUP_CC):
        return dict(BACKUP_SYSCTLS)
    return {k: v for k, v in BACKUP_SYSCTLS.items() if k != "net.ipv4.tcp_congestion_control"}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _restore_allowed_cc() -> None:
    """Take the algorithms the lab added out of the machine's allowed list
    again. If that fails, the record stays, and the next down() tries again."""
    if not os.path.exists(_ALLOWED_SAVED):
        return
    added = set(_read(_ALLOWED_SAVED).split())
    current = _read(_CC_PROC % "allowed").split()
    keep = [a for a in current if a not in added]
    if not keep:  # (a record from elsewhere: the list can never be empty)
        print("lab down: left tcp_allowed_congestion_control alone: %s" % " ".join(current), file=sys.stderr)
    elif keep != current:
        try:
            with open(_CC_PROC % "allowed", "w") as f:
                f.write(" ".join(keep))
        except OSError as e:
            print("lab down: could not take %s out of tcp_allowed_congestion_control (%s); "
                  "'lab down' tries again" % (" ".join(sorted(added)), e.strerror), file=sys.stderr)
            return
    os.unlink(_ALLOWED_SAVED)


def _sysctls(ns: str, kv: dict[str, str]) -> None:
    for k, v in kv.items():
        sh("sysctl", "-q", "-w", "%s=%s" % (k, v), ns=ns)


def _spawn(host: str, name: str, argv: list[str], env_role: Optional[str] = None) -> int:
    os.makedirs(os.path.join(STATE_DIR, "logs"), exist_ok=True)
    logf = open(os.path.join(STATE_DIR, "logs", "%s-%s.log" % (host, name)), "ab")
    env = dict(os.environ)
    if env_role:
        env["STTCP_ROLE"] = env_role
    env["PYTHONUNBUFFERED"] = "1"
    p = subprocess.Popen(["ip", "netns", "exec", HOSTS[host]] + argv, stdout=logf, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    logf.close()
    with open(os.path.join(STATE_DIR, "pids"), "a") as f:
        f.write("%s %s %d\n" % (host, name, p.pid))
    return p.pid


def _daemon_argv(role: str, host: str) -> list[str]:
    return [sys.executable, "-m", "nfq_sttcp", "--log-format", "json", "-v", role, "--config", config_path(),
            "--control-socket", control_path(host)]


def control_path(host: str) -> str:
    """Lab daemons' control sockets are named by host, not role: after a
    failover and a rejoin, the primary host runs the backup daemon."""
    return os.path.join(STATE_DIR, "ctl", "%s.sock" % host)


def control(host: str, command: str = "status", timeout: float = 2.0) -> dict:
    load_config()  # a clear error when the lab is not up
    return control_mod.request(control_path(host), command, timeout)


def _log_tail(host: str, name: str, lines: int = 8) -> str:
    path = os.path.join(STATE_DIR, "logs", "%s-%s.log" % (host, name))
    try:
        with open(path, errors="replace") as f:
            tail = f.readlines()[-lines:]
    except OSError:
        return ""
    return "".join("    " + line for line in tail)


def _wait(what: str, pred, timeout: float, log: Optional[tuple[str, str]] = None) -> None:
    deadline = time.monotonic() + timeout
    last_err = ""
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception as e:  # not up yet
            last_err = str(e)
        time.sleep(0.05)
    msg = "timed out waiting for %s%s" % (what, ": " + last_err if last_err else "")
    if log is not None:
        msg += "\n  last lines of the %s %s log:\n%s" % (log[0], log[1], _log_tail(*log))
    raise LabError(msg)


def _listening(host: str, port: int) -> bool:
    r = sh("ss", "-Hltn", "sport = :%d" % port, ns=HOSTS[host], check=False)
    return bool(r.stdout.strip())


def up(app: Optional[str] = None, ports: Optional[tuple[int, ...]] = None, interval_ms: int = 50, missed: int = 3,
       start_backup: bool = True, start_daemons: bool = True, progress=print, keepalived: bool = False,
       fast_path: bool = False, max_lag_kb: int = 256, max_lag_ms: int = Config.max_backup_lag_ms,
       fast_inbound: bool = Config.fast_inbound) -> Config:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces)")
    if namespaces():
        raise LabError("a lab is already up (%s): run 'nfq-sttcp lab down' first" % ", ".join(namespaces()))
    ports = tuple(ports or DEFAULT_PORTS)
    os.makedirs(os.path.join(STATE_DIR, "ctl"), exist_ok=True)
    try:
        progress("[1/5] network namespaces, LAN bridge and sync link")
        _build_network()
        keyfile = os.path.join(STATE_DIR, "sync.key")
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
        os.close(fd)
        cfg = lab_config(ports, interval_ms, missed, "keepalived" if keepalived else "builtin", fast_path, max_lag_kb,
                         max_lag_ms, fast_inbound)
        if keepalived and not shutil.which("keepalived"):
            raise LabError("--keepalived needs keepalived (apt-get install keepalived)")
        with open(config_path(), "w") as f:
            f.write(config_mod.render_toml(cfg))
        cfg = config_mod.load(config_path())
        progress("[2/5] application on primary and backup: %s" % (app or "built-in test server"))
        argv = ["sh", "-c", app] if app else [sys.executable, "-m", "nfq_sttcp.testapp"]
        with open(os.path.join(STATE_DIR, "app"), "w") as f:
            f.write(app or "")
        for host in ("primary", "backup"):
            _spawn(host, "app", argv, env_role=host)
        for host in ("primary", "backup"):
            for p in ports:
                _wait("%s to listen on port %d" % (host, p), lambda h=host, p=p: _listening(h, p), 15,
                      log=(host, "app"))
        if not start_daemons:
            progress("[3/5] no daemons: start them by hand (config %s)" % config_path())
            progress("[5/5] lab up without daemons")
            return cfg
        if keepalived:
            progress("[3/5] keepalived on the primary (VRRP owns the VIP), then the primary daemon")
            _start_keepalived(cfg, "primary")
            _wait("the primary's keepalived to become MASTER", lambda: vip_owner() == ["primary"], 20,
                  log=("primary", "keepalived"))
        else:
            progress("[3/5] primary daemon")
        _spawn("primary", "daemon", _daemon_argv("primary", "primary"))
        _wait("the primary daemon", lambda: control("primary")["state"] == "serving", 20,
              log=("primary", "daemon"))
        if start_backup:
            start_backup_daemon(progress)
        else:
            progress("[4/5] backup daemon deferred ('nfq-sttcp lab start-backup')")
        progress("[5/5] lab up: client %s -> VIP %s ports %s" % (CLIENT_IP, VIP, ",".join(map(str, ports))))
        return cfg
    except BaseException:
        down(quiet=True)
        raise


def _start_keepalived(cfg: Config, host: str) -> None:
    from . import keepalived
    # The console script, not "python -m": keepalived resolves the notify
    # program's symlinks before running it, and a venv's python is a symlink
    # to the base interpreter, which then runs outside the venv.
    entry = os.path.join(os.path.dirname(sys.executable), "nfq-sttcp")
    if not os.path.exists(entry):
        raise LabError("--keepalived needs the nfq-sttcp console script next to %s" % sys.executable)
    notify = " ".join([entry, "notify", "--config", config_path(), "--control-socket", control_path(host)])
    conf = os.path.join(STATE_DIR, "keepalived-%s.conf" % host)
    with open(conf, "w") as f:
        f.write(keepalived.render(cfg, host, notify, advert_ms=cfg.heartbeat_interval_ms))
    run = os.path.join(STATE_DIR, "keepalived-%s" % host)
    _spawn(host, "keepalived", ["keepalived", "--dont-fork", "--log-console", "--no-syslog", "--vrrp",
                                "--use-file", conf, "--pid", run + ".pid", "--vrrp_pid", run + "-vrrp.pid"])


def start_backup_daemon(progress=print) -> None:
    progress("[4/5] backup daemon, waiting until it follows the primary")
    cfg = load_config()
    if cfg.vip_owner == "keepalived":
        _start_keepalived(cfg, "backup")
    spawn_backup_daemon()
    _wait("the backup to follow the primary", lambda: control("backup")["state"] == "following", 20,
          log=("backup", "daemon"))
    _wait("the primary to see its backup and clone to it", lambda: _clones_to_its_backup("primary"), 10,
          log=("primary", "daemon"))


def spawn_backup_daemon() -> None:
    """Start the backup's daemon alone, waiting for nothing (a test of what
    it does on a host where something has happened already)."""
    _spawn("backup", "daemon", _daemon_argv("backup", "backup"))


def _clones_to_its_backup(host: str) -> bool:
    """The serving ``host`` sees its backup, and its clone rules are in. (A
    client's SYN before them, a few ms after the backup is seen, never
    reaches the backup, and its SYN-ACK waits for the SYN to come again, a
    second later: seen as a test's connection sending two SYNs.)"""
    st = control(host)
    return st["backup"] == "present" and st.get("cloning") is True


def _kill_ns(ns: str, sig: int) -> int:
    r = sh("ip", "netns", "pids", ns, check=False)
    n = 0
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), sig)
            n += 1
        except (ProcessLookupError, ValueError):
            pass
    return n


def crash(host: str = "primary") -> tuple[float, float]:
    """A host crash: from this instant it sends and receives nothing, then its
    processes die. Returns (time.monotonic(), time.time()) of the crash."""
    ns = HOSTS[host]
    if ns not in namespaces():
        raise LabError("no %s namespace: is the lab up?" % ns)
    # Both links in one batch (one process, back-to-back netlink requests):
    # separate commands let the sync link outlive the LAN by 100+ ms on a
    # loaded machine, which is a different failure (a partition).
    ifaces = [CLIENT_IF] if host == "client" else [LAN_IF, SYNC_IF]
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="".join("link set %s down\n" % i for i in ifaces),
                   text=True, capture_output=True, check=False)
    # The instant by which the host is certainly cut off.
    t, wall = time.monotonic(), time.time()
    _kill_ns(ns, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while _ns_pids([ns]) and time.monotonic() < deadline:
        _kill_ns(ns, signal.SIGKILL)
        time.sleep(0.02)
    with open(os.path.join(STATE_DIR, "crashes"), "a") as f:
        f.write("%s %.6f %.6f\n" % (host, t, wall))
    return t, wall


def kill_daemon(host: str, sig: int = signal.SIGKILL) -> tuple[float, float]:
    """Signal the daemon on ``host`` (SIGKILL: a handler dies, its host lives).
    Returns (time.monotonic(), time.time()) of the kill."""
    pids = []
    with open(os.path.join(STATE_DIR, "pids")) as f:
        for line in f:
            h, name, pid = line.split()
            if h == host and name == "daemon" and not _gone(int(pid)):
                pids.append(int(pid))
    if not pids:
        raise LabError("no daemon runs on %s" % host)
    t, wall = time.monotonic(), time.time()
    for pid in pids:
        os.kill(pid, sig)
    return t, wall


def mac(host: str) -> str:
    """The MAC address of a server's LAN interface."""
    out = sh("ip", "-o", "link", "show", "dev", LAN_IF if host != "client" else CLIENT_IF, ns=HOSTS[host]).stdout
    return out.split("link/ether ")[1].split()[0]


def reboot(host: str) -> None:
    """Bring a crashed server back as a host, not yet a server: no socket of
    its old life, the VIP on lo, the backup's sysctls, its replies fenced,
    then its links up. Its application and daemon are not started."""
    ns = HOSTS[host]
    if _ns_pids([ns]):
        raise LabError("%s still runs processes: crash it first ('lab crash %s')" % (host, host))
    # A killed process leaves orphan sockets that retransmit their FIN: with
    # the same sequence space as the connection the other host now serves,
    # the client would take it. Destroy them while the links are still down.
    sh("ss", "-K", "-t", "-a", ns=ns, check=False)
    sh("ip", "addr", "del", VIP + "/24", "dev", LAN_IF, ns=ns, check=False)
    sh("ip", "addr", "replace", VIP + "/32", "dev", "lo", ns=ns)
    _sysctls(ns, _backup_sysctls())
    from . import rules
    r = subprocess.run(["ip", "netns", "exec", ns, "iptables-restore", "-w", "--noflush"], text=True,
                       input=rules.render(load_config(), "backup", fence=True), capture_output=True)
    if r.returncode != 0:
        raise LabError("cannot fence %s: %s" % (host, r.stderr.strip()))
    sh("ip", "link", "set", LAN_IF, "up", ns=ns)
    sh("ip", "link", "set", SYNC_IF, "up", ns=ns)


def rejoin(host: str = "primary", progress=print) -> None:
    """Restart a crashed server as the backup of the server that took over,
    as after a reboot: no socket of its old life survives, the VIP sits on lo,
    and its replies are fenced before its links come back."""
    ns, other = HOSTS[host], "backup" if host == "primary" else "primary"
    cfg = load_config()
    try:
        serving = control(other).get("serving_as") == "primary"
    except (OSError, ValueError) as e:
        raise LabError("the %s daemon does not answer (%s): nothing to rejoin" % (other, e)) from None
    if not serving:
        raise LabError("the %s has not taken over: 'lab rejoin' follows 'lab crash %s' and a failover" % (other, host))
    if "LOWER_UP" not in sh("ip", "-o", "link", "show", "dev", SYNC_IF, ns=ns).stdout:
        progress("[1/4] %s reboots: sockets of its old life destroyed, VIP on lo, replies fenced" % host)
        reboot(host)
    else:
        progress("[1/4] %s is up (rebooted already)" % host)
    progress("[2/4] application on %s" % host)
    app = open(os.path.join(STATE_DIR, "app")).read() if os.path.exists(os.path.join(STATE_DIR, "app")) else ""
    _spawn(host, "app", ["sh", "-c", app] if app else [sys.executable, "-m", "nfq_sttcp.testapp"], env_role="backup")
    for p in cfg.ports:
        _wait("%s to listen on port %d" % (host, p), lambda p=p: _listening(host, p), 15, log=(host, "app"))
    progress("[3/4] backup daemon on %s, waiting until it follows the %s" % (host, other))
    _spawn(host, "daemon", _daemon_argv("backup", host))
    _wait("%s to follow %s" % (host, other), lambda: control(host)["state"] == "following", 20, log=(host, "daemon"))
    _wait("%s to see its new backup and clone to it" % other, lambda: _clones_to_its_backup(other), 10,
          log=(other, "daemon"))
    progress("[4/4] %s serves, %s is its backup: new connections are protected" % (other, host))


def switchover(progress=print) -> tuple[str, float, float]:
    """Planned handover from the serving host to its backup. Returns the host
    that serves now and (time.monotonic(), time.time()) of the request."""
    serving = [h for h in ("primary", "backup") if _answers(h) and control_mod.serves(control(h))]
    if not serving:
        raise LabError("no lab daemon serves the VIP: nothing to switch over")
    host = serving[0]
    other = "backup" if host == "primary" else "primary"
    t, wall = time.monotonic(), time.time()
    r = control_mod.switchover(control_path(host))
    if not r["done"]:
        raise LabError("switchover from %s failed: %s" % (host, r.get("error")))
    _wait("%s to serve" % other, lambda: control(other)["state"] == "active", 10, log=(other, "daemon"))
    progress("switchover: %s serves, %s is fenced (its daemon exited)" % (other, host))
    return other, t, wall


def _answers(host: str) -> bool:
    try:
        control(host, timeout=1.0)
        return True
    except (OSError, ValueError):
        return False


def vip_owner() -> list[str]:
    """Hosts that hold the VIP on a LAN interface that is up (a crashed host
    keeps the address, but its link is down)."""
    owners = []
    for host in ("primary", "backup"):
        r = sh("ip", "-4", "-o", "addr", "show", "dev", LAN_IF, ns=HOSTS[host], check=False)
        link = sh("ip", "-o", "link", "show", "dev", LAN_IF, ns=HOSTS[host], check=False).stdout
        if (" %s/" % VIP) in r.stdout and "LOWER_UP" in link:
            owners.append(host)
    return owners


def status() -> dict:
    st: dict = {"namespaces": namespaces(), "vip": VIP, "vip_owner": vip_owner(), "daemons": {}}
    for role in ("primary", "backup"):
        try:
            st["daemons"][role] = control(role, timeout=1.0)
        except (OSError, ValueError, LabError) as e:
            st["daemons"][role] = {"state": "down", "error": str(e) or type(e).__name__}
    return st


def exec_in(host: str, argv: list[str]) -> int:
    if host not in HOSTS or HOSTS[host] not in namespaces():
        raise LabError("no host %r in the lab (is it up?)" % host)
    return subprocess.call(["ip", "netns", "exec", HOSTS[host]] + argv)


def congestion_controls() -> dict[str, str]:
    """Each host's TCP congestion control (the backup's: BACKUP_SYSCTLS)."""
    out = {}
    for host in ("client", "primary", "backup"):
        r = sh("sysctl", "-n", "net.ipv4.tcp_congestion_control", ns=HOSTS[host], check=False)
        out[host] = r.stdout.strip() or "?"
    return out


def place_hosts(separate: bool = True) -> dict[str, list[int]]:
    """Put every process of each server host, threads included, on CPUs of
    its own, as on two machines; ``separate=False`` gives them every CPU
    again. The client stays free. Returns the CPUs each host got.

    On a 2-CPU machine the backup's work for each request (a clone in, a
    reply held, a confirmation sent: some 90 us of CPU) otherwise competes
    with the primary's reply for a CPU, which it never does in a deployment.
    The kernel's packet work still runs where the sending process does."""
    cpus = sorted(os.sched_getaffinity(0))
    if separate and len(cpus) < 2:
        raise LabError("placing the hosts apart needs two CPUs; this machine gives us %d" % len(cpus))
    half = len(cpus) // 2
    placement = {"primary": cpus[:half], "backup": cpus[half:]} if separate else \
        {"primary": cpus, "backup": cpus}
    present = namespaces()
    for host in placement:
        if HOSTS[host] not in present:
            raise LabError("no host %r in the lab (is it up?)" % host)
    for _ in range(5):
        # Again until a pass moves nothing: a thread started meanwhile by one
        # not yet moved inherits its creator's CPUs, not ours.
        moved = 0
        for host, mine in placement.items():
            want = set(mine)
            for pid in _ns_pids([HOSTS[host]]):
                try:
                    tids = [int(t) for t in os.listdir("/proc/%d/task" % pid)]
                except FileNotFoundError:
                    continue  # gone meanwhile
                for tid in tids:  # (affinity is per thread)
                    try:
                        if os.sched_getaffinity(tid) != want:
                            os.sched_setaffinity(tid, want)
                            moved += 1
                    except ProcessLookupError:
                        pass  # exited meanwhile
                    except PermissionError as e:
                        raise LabError("cannot move thread %d of the %s host: %s (run as root)" % (tid, host, e))
        if not moved:
            break
    return placement


def _ns_pids(nss: list[str]) -> set[int]:
    pids: set[int] = set()
    for ns in nss:
        pids |= {int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()}
    return pids


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def down(quiet: bool = False, keep_logs: Optional[str] = None) -> None:
    """Remove everything the lab made; harmless when nothing is there. Returns
    only when every lab process is gone. With ``keep_logs`` (or the
    environment's STTCP_LAB_KEEP_LOGS) the daemons' and applications' logs
    are copied there first."""
    nss = namespaces()
    pids = _ns_pids(nss)
    pidfile = os.path.join(STATE_DIR, "pids")
    if os.path.exists(pidfile):
        for line in open(pidfile):
            try:
                pids.add(int(line.split()[2]))
            except (ValueError, IndexError):
                pass
    for ns in nss:
        _kill_ns(ns, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and _ns_pids(nss):
        time.sleep(0.05)
    for ns in nss:
        _kill_ns(ns, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(_gone(p) for p in pids | _ns_pids(nss)):
        time.sleep(0.02)
    for ns in nss:
        sh("ip", "netns", "del", ns, check=False)
    _restore_allowed_cc()
    if os.path.isdir(STATE_DIR):
        keep = keep_logs or os.environ.get("STTCP_LAB_KEEP_LOGS")
        if keep and os.path.isdir(os.path.join(STATE_DIR, "logs")):
            dest = os.path.join(keep, time.strftime("lab-%H%M%S-") + str(os.getpid()))
            os.makedirs(keep, exist_ok=True)
            subprocess.run(["cp", "-r", os.path.join(STATE_DIR, "logs"), dest], check=False)
        subprocess.run(["rm", "-rf", STATE_DIR], check=False)
    if not quiet:
        print("lab down: removed %s" % (", ".join(nss) if nss else "nothing (no lab was up)"))

