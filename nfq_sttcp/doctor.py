"""`nfq-sttcp doctor`: a preflight check of one host, and of the pair.

Three parts, kept apart:

- ``gather`` reads this host (sysctls, interfaces, listening ports, the
  iptables backend) and tries each kernel feature for real: it installs an
  NFQUEUE, a TEE and a conntrack rule in a scratch network namespace that it
  deletes again. The host's own tables are never touched.
- ``check_host`` and ``compare`` are pure: facts in, findings out, each with
  the fix in plain words.
- ``exchange`` swaps facts with the doctor run on the peer, over the sync
  link (UDP, port sync.port + 1, HMAC-signed with the sync key when there is
  one). Start both within ``--wait`` seconds of each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from . import firewall, nfqueue
from .config import Config

OK, WARN, FAIL = "ok", "warn", "fail"
# + pid: the doctors of both roles may run at once on one machine (the lab).
# Not "sttcp-": the lab owns those names and deletes them on "lab down".
SCRATCH_PREFIX = "nfqdoctor-"
TCP_SYSCTLS = ("tcp_timestamps", "tcp_sack", "tcp_window_scaling", "tcp_rmem", "tcp_wmem", "tcp_congestion_control",
               "tcp_no_metrics_save")
# The backup's stack, while it follows, sends only into its own queue: its
# congestion control sees the loop through both daemons, not a network, and
# it sets the pair's pace once the primary's segments leave by the kernel
# (the fast path). What holds it back:
# * a control that paces a socket by itself (bbr): it paces at the delivery
#   rate it measures from the acks the daemon shows it, which come at the
#   primary's pace, while the primary waits at its lag bound for the backup.
#   An unshaped lab download, the backup's stack alone switched, alternating
#   in one lab (4 runs each): bbr 4.56, cubic 5.67 Gbit/s;
# * HyStart (cubic's slow-start exit): it leaves slow start when the RTT
#   grows, and the hold makes it grow from the first window on, so the
#   window stays at some 400 segments. reno has none. Fast path, one lab
#   each, 6 pairs of 400 MB against plain TCP, medians: cubic 0.51 and 0.55
#   (metrics not saved), reno 0.75, reno with metrics not saved 0.72, 0.74;
# * the route metrics cache: a connection whose window was cut (a client's
#   SACK of segments the kernel path swapped) leaves its ssthresh to the next
#   one to that client, which then leaves slow start there. With cubic
#   without HyStart (a host-wide module parameter, for the measurement),
#   the first two downloads of a lab ran at 0.91 and 0.87 of plain TCP and
#   the next four at 0.40-0.62; with tcp_no_metrics_save=1 too, 0.67-0.79.
PACING_CCS = ("bbr",)
BACKUP_CC = "reno"
BACKUP_TCP_SYSCTLS = {"net.ipv4.tcp_congestion_control": BACKUP_CC, "net.ipv4.tcp_no_metrics_save": "1"}


FEATURE_FIX = {
    "NFQUEUE": "modprobe xt_NFQUEUE nfnetlink_queue (CONFIG_NETFILTER_XT_TARGET_NFQUEUE), and iptables-nft",
    "TEE": "modprobe xt_TEE (CONFIG_NETFILTER_XT_TARGET_TEE)",
    "conntrack": "modprobe xt_conntrack nf_conntrack (CONFIG_NF_CONNTRACK, CONFIG_NETFILTER_XT_MATCH_CONNTRACK)",
    "mark": "modprobe xt_mark (CONFIG_NETFILTER_XT_MARK)",
    "nfnetlink_queue": "modprobe nfnetlink_queue (CONFIG_NETFILTER_NETLINK_QUEUE): /proc/net/netfilter/"
                       "nfnetlink_queue appears once it is loaded",
    "fast path": "tuning.fast_path needs the bpf() system call (CONFIG_BPF_SYSCALL) and the bpf match "
                 "(modprobe xt_bpf; CONFIG_NETFILTER_XT_MATCH_BPF); or set fast_path = false",
    "inbound in the kernel": "tuning.fast_inbound needs tc (apt-get install iproute2), the bpf() system call and "
                             "cls_bpf with clsact (CONFIG_NET_CLS_BPF, CONFIG_NET_SCH_INGRESS); without them the "
                             "daemon maps every client segment itself (slower, still right)",
}
CLONE_NEWNET = 0x40000000
# Features the daemon does without (it warns and takes the slow way): a warning, not a failure.
OPTIONAL_FEATURES = {"inbound in the kernel"}


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | fail
    what: str
    detail: str = ""
    fix: str = ""


def backup_sysctls(lan_if: str, sync_if: Optional[str] = None) -> dict[str, str]:
    """What the backup needs: it holds the VIP on lo (it must not answer ARP
    for it) and receives clones for that address on the sync interface (the
    reverse-path filter would drop them; it applies the larger of "all" and
    the interface's value)."""
    out = {"net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2",
           "net.ipv4.conf.%s.arp_ignore" % lan_if: "1", "net.ipv4.conf.%s.arp_announce" % lan_if: "2",
           "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.%s.rp_filter" % lan_if: "0",
           "net.ipv4.conf.lo.rp_filter": "0"}
    if sync_if and sync_if != lan_if:
        out["net.ipv4.conf.%s.rp_filter" % sync_if] = "0"
    # The mark our injections and the kernel's mapped clones carry skips the
    # queues; with fwmark_reflect the stack's own RST or ACK answering such a
    # packet would carry it too, skip the hold, and reach the client.
    out["net.ipv4.fwmark_reflect"] = "0"
    return out


# == gathering (side effects) ==============================================

def _sysctl(name: str) -> Optional[str]:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return " ".join(f.read().split())
    except OSError:
        return None


def _run(argv: list[str], ns: Optional[str] = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + argv
    return subprocess.run(cmd, capture_output=True, text=True)


@contextlib.contextmanager
def _scratch_config(cfg: Config) -> Iterator[Config]:
    """``cfg`` with its control socket directory in a fresh temporary one
    (where a kernel path mounts and pins), removed after (if empty)."""
    import dataclasses
    import tempfile

    d = tempfile.mkdtemp(prefix="nfq-sttcp-doctor-bpf-")
    try:
        yield dataclasses.replace(cfg, control_socket_dir=d)
    finally:
        try:
            os.rmdir(d)
        except OSError:
            pass


def _try_fast_path(scratch: str, cfg: Config) -> str:
    """The primary's fast path, tried as its daemon sets it up (driver.FastPath:
    maps, program, a bpf file system, the pin), in a directory of its own,
    then put behind a bpf match in the scratch namespace ("" when that works)."""
    from .bpf import BpfError
    from .driver import FastPath

    try:
        with _scratch_config(cfg) as c:
            fast = FastPath(c)
            try:
                r = _run(["iptables", "-w", "-t", "mangle", "-A", "POSTROUTING", "-m", "bpf", "--object-pinned",
                          fast.pinned, "-j", "ACCEPT"], ns=scratch)
                return "" if r.returncode == 0 else (r.stderr.strip() or "iptables exit %d" % r.returncode)
            finally:
                fast.close()
    except (BpfError, OSError) as e:
        return str(e)


def _try_fast_inbound(scratch: str, cfg: Config) -> str:
    """The backup's inbound program, set up as its daemon does (driver.FastIn)
    on a veth in the scratch namespace ("" when that works)."""
    import ctypes

    from .bpf import BpfError
    from .driver import FastIn
    from .firewall import FirewallError

    r = _run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"], ns=scratch)
    if r.returncode != 0:
        return r.stderr.strip() or "ip link add exit %d" % r.returncode
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with _scratch_config(cfg) as c:
            fd = os.open("/run/netns/" + scratch, os.O_RDONLY)
            own = os.open("/proc/self/ns/net", os.O_RDONLY)
            try:
                # tc runs in our namespace: enter the scratch one for it (os.setns is 3.12+).
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    return "setns: %s" % os.strerror(ctypes.get_errno())
                FastIn(c, "d0").close()
                return ""
            finally:
                libc.setns(own, CLONE_NEWNET)
                os.close(fd)
                os.close(own)
    except (BpfError, OSError, FirewallError) as e:
        return str(e)


def _try_features(fast_path_cfg: Optional[Config] = None, fast_inbound_cfg: Optional[Config] = None) -> dict[str, str]:
    """Each netfilter feature nfq-sttcp uses, tried in a scratch namespace:
    "" when it works, else the error."""
    rules = {
        "NFQUEUE": ["-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", "9",
                    "--queue-bypass"],
        "TEE": ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-j", "TEE", "--gateway", "127.0.0.1"],
        "conntrack": ["-t", "filter", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"],
        "mark": ["-t", "raw", "-A", "OUTPUT", "-m", "mark", "--mark", "0x5717", "-j", "ACCEPT"],
    }
    out: dict[str, str] = {}
    scratch = SCRATCH_PREFIX + str(os.getpid())
    r = _run(["ip", "netns", "add", scratch])
    if r.returncode != 0:
        return {"scratch": r.stderr.strip() or "ip netns add failed"}
    import signal

    def interrupted(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # so the scratch namespace is deleted below

    old = signal.signal(signal.SIGTERM, interrupted)
    try:
        for name, argv in rules.items():
            r = _run(["iptables", "-w"] + argv, ns=scratch)
            out[name] = "" if r.returncode == 0 else (r.stderr.strip() or "iptables exit %d" % r.returncode)
        if fast_path_cfg is not None:  # (a primary's config with tuning.fast_path)
            out["fast path"] = _try_fast_path(scratch, fast_path_cfg)
        if fast_inbound_cfg is not None:  # (a backup's config with tuning.fast_inbound)
            out["inbound in the kernel"] = _try_fast_inbound(scratch, fast_inbound_cfg)
    finally:
        _run(["ip", "netns", "del", scratch])  # also when killed by SIGTERM (raised as KeyboardInterrupt)
        signal.signal(signal.SIGTERM, old)
    out["nfnetlink_queue"] = "" if os.path.exists("/proc/net/netfilter/nfnetlink_queue") else "not in this kernel"
    return out


def _listening_ports() -> list[int]:
    r = _run(["ss", "-Hltn"])
    ports = set()
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3].rsplit(":", 1)[-1].isdigit():
            ports.add(int(parts[3].rsplit(":", 1)[-1]))
    return sorted(ports)


def local_addresses() -> dict[str, str]:
    """This host's IPv4 addresses, each with its interface."""
    r = _run(["ip", "-4", "-o", "addr", "show"])
    return {line.split()[3].split("/")[0]: line.split()[1] for line in r.stdout.splitlines() if len(line.split()) > 3}


def _mtu(ifname: str) -> Optional[int]:
    try:
        with open("/sys/class/net/%s/mtu" % ifname) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _c_extension() -> dict[str, bool]:
    """Whether nfq_sttcp/_csum.c is built, and computes CRC-32C in hardware,
    and whether nfq_sttcp/_bpfsys.c is built."""
    from . import bpf

    bpf_built = bpf.native is not None or bpf._native() is not None  # (the second: NFQ_STTCP_PURE_BPF set here)
    try:
        from . import _csum
    except ImportError:
        return {"built": False, "crc32c_hw": False, "bpf_built": bpf_built}
    return {"built": True, "crc32c_hw": bool(_csum.crc32c_in_hardware()), "bpf_built": bpf_built}


def _state_dir(path: str) -> dict[str, Any]:
    """Whether the daemon can keep its epoch in ``path``, and on what file
    system (a tmpfs forgets it at reboot)."""
    real = os.path.realpath(path)  # (a symlink into /run is on /run's file system)
    if os.path.exists(real) and not os.path.isdir(real):
        return {"path": path, "writable": False, "fstype": None, "problem": "not a directory"}
    existing = real
    while not os.path.isdir(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    fstype, best = None, ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mnt = fields[1].replace("\\040", " ")
                    if (existing == mnt or existing.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                        best, fstype = mnt, fields[2]
    except OSError:
        pass
    return {"path": path, "writable": os.access(existing, os.W_OK), "fstype": fstype}


def gather(cfg: Config, role: str, addresses: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Everything the checks need about this host (``addresses``: from
    local_addresses(), if the caller has them already)."""
    r = _run(["iptables", "--version"])
    addresses = local_addresses() if addresses is None else addresses
    sync_if = addresses.get(cfg.own_addresses(role)[0])
    wanted = set(backup_sysctls(cfg.lan_interface, sync_if)) | {"net.core.rmem_max"} | \
        {"net.ipv4." + k for k in TCP_SYSCTLS}
    return {
        "role": role,
        "root": os.geteuid() == 0,
        "iptables": r.stdout.strip() if r.returncode == 0 else "",
        "features": _try_features(cfg if cfg.fast_path and role == "primary" else None,
                                  cfg if cfg.fast_inbound and role == "backup" else None) if os.geteuid() == 0 else {},
        "fast_path": cfg.fast_path,
        "lag_bound": [cfg.max_backup_lag_kb, cfg.max_backup_lag_ms],
        "sysctls": {k: _sysctl(k) for k in sorted(wanted)},
        "lan_mtu": _mtu(cfg.lan_interface),
        "packet_sizes": firewall.queue_packet_sizes([cfg.lan_interface, sync_if]),
        "addresses": sorted(addresses),
        "sync_if": sync_if,
        "listening": _listening_ports(),
        "c_extension": _c_extension(),
        "state_dir": _state_dir(cfg.state_dir),
    }


# == checks (pure) =========================================================

def check_host(facts: dict[str, Any], cfg: Config) -> list[Finding]:
    role = facts["role"]
    out: list[Finding] = []
    if not facts["root"]:
        return [Finding(FAIL, "privilege", "not root", "run the daemons (and doctor) as root: they need "
                        "CAP_NET_ADMIN for iptables, NFQUEUE and the VIP")]
    for feature, err in sorted(facts["features"].items()):
        if feature == "scratch":
            out.append(Finding(WARN, "kernel features untested", "no scratch namespace: %s" % err,
                               "the features are tried in a throwaway network namespace: run doctor where "
                               "'ip netns add' works"))
        elif err:
            out.append(Finding(WARN if feature in OPTIONAL_FEATURES else FAIL, "kernel feature %s" % feature, err,
                               FEATURE_FIX.get(feature, "")))
        else:
            out.append(Finding(OK, "kernel feature %s" % feature))
    ipt = facts["iptables"]
    if not ipt:
        out.append(Finding(FAIL, "iptables", "not found", "apt-get install iptables"))
    elif "nf_tables" in ipt:
        out.append(Finding(OK, "iptables backend", ipt))
    else:
        out.append(Finding(WARN, "iptables backend", ipt, "iptables-nft is the tested backend: "
                           "update-alternatives --set iptables /usr/sbin/iptables-nft"))
    if facts["lan_mtu"] is None:
        out.append(Finding(FAIL, "LAN interface", "%s does not exist" % cfg.lan_interface,
                           "set lan_interface to the interface that carries the VIP"))
    sizes = facts.get("packet_sizes") or {}
    problems = nfqueue.oversize_problems(sizes)
    for ifname, problem in problems:
        if problem:
            out.append(Finding(FAIL, "packet size %s" % ifname, problem, nfqueue.oversize_fix(ifname)))
        else:
            out.append(Finding(WARN, "packet size %s" % ifname, "its GSO and GRO sizes could not be read",
                               "a packet over 64 KB cannot cross a queue whole: check with ip -d link show"))
    if sizes and not problems:
        out.append(Finding(OK, "packets within 64 KB on %s" % ", ".join(sorted(sizes))))
    mine = cfg.own_addresses(role)[0]
    if mine not in facts["addresses"]:
        out.append(Finding(FAIL, "sync address", "%s (sync.%s) is not on this host" % (mine, role),
                           "add it to the sync interface, or run the other role here"))
    if role == "backup":
        bad = {k: v for k, v in backup_sysctls(cfg.lan_interface, facts.get("sync_if")).items()
               if facts["sysctls"].get(k) != v}
        for k, v in sorted(bad.items()):
            out.append(Finding(FAIL, "sysctl %s" % k, "is %s, the backup needs %s" % (facts["sysctls"].get(k), v),
                               "sysctl -w %s=%s (and persist it in /etc/sysctl.d/)" % (k, v)))
        if not bad:
            out.append(Finding(OK, "backup sysctls (ARP and reverse-path filter)"))
        cc = facts["sysctls"].get("net.ipv4.tcp_congestion_control")
        if cc and cc != BACKUP_CC:
            why = "paces the backup's stack by the acks it is shown, which follow the primary" \
                if cc.startswith(PACING_CCS) else "leaves slow start early (HyStart) or is not the one measured"
            out.append(Finding(WARN, "congestion control", "%s %s: the pair runs slower (an unshaped lab download "
                               "with the fast path ran at 0.51 of plain TCP with cubic, 0.75 with reno; bbr is "
                               "slower than cubic)" % (cc, why),
                               "sysctl -w net.ipv4.tcp_congestion_control=%s on the backup, for connections opened "
                               "after (a primary that may rejoin as the backup after a failover: there too); the "
                               "connections it takes over keep it" % BACKUP_CC))
        if facts["sysctls"].get("net.ipv4.tcp_no_metrics_save") not in (None, "1"):
            out.append(Finding(WARN, "tcp_no_metrics_save", "0: a protected connection whose window was cut leaves "
                               "its ssthresh to the next one to that client, which then runs slower",
                               "sysctl -w net.ipv4.tcp_no_metrics_save=1 on the backup (and on a primary that may "
                               "rejoin as the backup)"))
    ext = facts.get("c_extension")
    if ext is not None and not ext["built"]:
        out.append(Finding(WARN, "C extension", "nfq_sttcp/_csum.c is not built: checksums and output digests "
                           "run in pure Python, a bulk transfer hundreds of times slower",
                           "install build-essential and python3-dev, then reinstall the package"))
    elif ext is not None and not ext["crc32c_hw"]:
        out.append(Finding(WARN, "C extension", "no SSE4.2 crc32 instruction: output digests use a table, "
                           "several times slower", "expected only on CPUs other than x86-64"))
    elif ext is not None:
        out.append(Finding(OK, "C extension (checksums, CRC-32C in hardware)"))
    if ext is not None and not ext.get("bpf_built", True) and (cfg.fast_inbound or cfg.fast_path):
        out.append(Finding(WARN, "C extension (bpf)", "nfq_sttcp/_bpfsys.c is not built: the kernel paths' map "
                           "calls go through ctypes, some 3.5 us slower each (one or two a packet)",
                           "install build-essential and python3-dev, then reinstall the package"))
    state = facts.get("state_dir")
    if state is not None:
        why = ("a host whose clock steps back across a reboot is then refused by its peer (as a replay) "
               "until the peer's daemon restarts too")
        if not state["writable"]:
            out.append(Finding(WARN, "state_dir", "%s cannot be written%s: each start takes its epoch from the "
                               "clock alone; %s" % (state["path"], " (%s)" % state["problem"]
                                                    if state.get("problem") else "", why),
                               "make it a directory root can write (run doctor as root), or set state_dir "
                               "to one"))
        elif state["fstype"] in ("tmpfs", "ramfs"):
            out.append(Finding(WARN, "state_dir", "%s is on %s: the last epoch is forgotten at reboot; %s"
                               % (state["path"], state["fstype"], why), "set state_dir to a directory on disk, "
                               "such as /var/lib/nfq-sttcp"))
        elif state["fstype"] is None:
            out.append(Finding(WARN, "state_dir", "%s: its file system could not be told (/proc/self/mounts)"
                               % state["path"], "check that it is on disk, not a tmpfs"))
        else:
            out.append(Finding(OK, "state_dir %s kept across reboots" % state["path"]))
    missing = [p for p in cfg.ports if p not in facts["listening"]]
    if missing:
        out.append(Finding(WARN, "application", "nothing listens on port(s) %s" % ", ".join(map(str, missing)),
                           "start the service on both hosts, with the same ports"))
    else:
        out.append(Finding(OK, "application listens on %s" % ", ".join(map(str, cfg.ports))))
    return out


def window_scale(sysctls: dict[str, Optional[str]]) -> Optional[int]:
    """The window scale Linux offers in a SYN-ACK, from the largest receive
    buffer it may use (tcp_rmem's max, or rmem_max if larger)."""
    try:
        space = max(int((sysctls.get("net.ipv4.tcp_rmem") or "").split()[2]), int(sysctls.get("net.core.rmem_max") or 0))
    except (IndexError, ValueError):
        return None
    if sysctls.get("net.ipv4.tcp_window_scaling") == "0":
        return 0
    # tcp_select_initial_window(): ilog2(space) - 15, clamped to 0..14
    return max(0, min(14, space.bit_length() - 1 - 15)) if space > 0 else 0


def compare(mine: dict[str, Any], theirs: dict[str, Any]) -> list[Finding]:
    """What differs between the two hosts and would break a migration (the
    backup's SYN-ACK must carry the options the primary's did)."""
    try:
        return _compare(mine, theirs)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        return [Finding(FAIL, "peer", "its doctor sent facts this one cannot read (%s: %s)" % (type(e).__name__, e),
                        "run the same nfq-sttcp version on both hosts")]


def _compare(mine: dict[str, Any], theirs: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    a, b = mine["sysctls"], theirs["sysctls"]
    who = "this host (%s) vs the peer (%s)" % (mine["role"], theirs["role"])

    def on(v: Optional[str]) -> Optional[bool]:
        return None if v is None else v != "0"

    for key, label in (("net.ipv4.tcp_timestamps", "TCP timestamps"), ("net.ipv4.tcp_sack", "SACK"),
                       ("net.ipv4.tcp_window_scaling", "window scaling")):
        if on(a.get(key)) != on(b.get(key)):
            out.append(Finding(FAIL, label, "%s: %s vs %s" % (who, a.get(key), b.get(key)),
                               "set %s the same on both hosts: connections whose options differ stay "
                               "unprotected" % key))
        else:
            out.append(Finding(OK, "%s alike (%s)" % (label, a.get(key))))
    if mine.get("fast_path") is not None and theirs.get("fast_path") is not None:
        if mine["fast_path"] != theirs["fast_path"]:
            out.append(Finding(WARN, "fast path", "%s: tuning.fast_path %s vs %s" % (
                who, mine["fast_path"], theirs["fast_path"]), "protection works either way (the backup learns "
                "from each ISN message whether digests follow), but the hosts serve at different speeds after "
                "they swap roles: set tuning.fast_path the same on both"))
        else:
            out.append(Finding(OK, "fast path alike (%s)" % ("on" if mine["fast_path"] else "off")))
    if mine.get("lag_bound") is not None and theirs.get("lag_bound") is not None:
        if mine["lag_bound"] != theirs["lag_bound"]:
            out.append(Finding(WARN, "lag bound", "%s: tuning.max_backup_lag_kb / _ms %s vs %s" % (
                who, mine["lag_bound"], theirs["lag_bound"]), "set both the same: the serving primary's bound is "
                "the one in force, so it changes when the hosts swap roles, and a backup checks client acks "
                "against its own setting (with max_backup_lag_ms 0 it refuses acks more than max_backup_lag_kb "
                "+ 4 MB beyond its output, which a primary's paced bound can exceed)"))
        else:
            out.append(Finding(OK, "lag bound alike (%s KB, %s ms)" % tuple(mine["lag_bound"])))
    wa, wb = window_scale(a), window_scale(b)
    if wa != wb:
        out.append(Finding(FAIL, "window scale", "%s: %s vs %s (from tcp_rmem %r / %r, rmem_max %s / %s)" % (
            who, wa, wb, a.get("net.ipv4.tcp_rmem"), b.get("net.ipv4.tcp_rmem"), a.get("net.core.rmem_max"),
            b.get("net.core.rmem_max")), "give net.ipv4.tcp_rmem and net.core.rmem_max the same values on both"))
    else:
        out.append(Finding(OK, "window scale alike (%s)" % wa))
    if mine["lan_mtu"] != theirs["lan_mtu"]:
        out.append(Finding(FAIL, "MTU", "%s: %s vs %s" % (who, mine["lan_mtu"], theirs["lan_mtu"]),
                           "use the same MTU on both LAN interfaces: the MSS in each SYN-ACK follows it"))
    else:
        out.append(Finding(OK, "LAN MTU alike (%s)" % mine["lan_mtu"]))
    only_a = sorted(set(mine["listening"]) - set(theirs["listening"]))
    only_b = sorted(set(theirs["listening"]) - set(mine["listening"]))
    if only_a or only_b:
        out.append(Finding(WARN, "listening ports differ", "only here: %s; only on the peer: %s" % (only_a, only_b),
                           "run the same application, on the same ports, on both hosts"))
    return out


# == the pair, over the sync link ==========================================

def _sign(key: Optional[bytes], payload: bytes) -> bytes:
    return payload + (hmac.new(key, payload, hashlib.sha256).digest() if key else b"")


def _verify(key: Optional[bytes], data: bytes) -> Optional[bytes]:
    if not key:
        return data
    payload, tag = data[:-32], data[-32:]
    return payload if hmac.compare_digest(tag, hmac.new(key, payload, hashlib.sha256).digest()) else None


def exchange(cfg: Config, role: str, facts: dict[str, Any], wait_s: float = 30.0) -> Optional[dict[str, Any]]:
    """Send our facts to the peer's doctor and receive its own; None if it
    never answered within ``wait_s``. Keeps sending for a second after it
    heard the peer, so the peer hears us too."""
    key = cfg.read_key()
    port = cfg.sync_port + 1
    me, peer = cfg.own_addresses(role)[0], cfg.peer_addresses(role)[0]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((me, port))
    s.settimeout(0.2)
    msg = _sign(key, json.dumps({"doctor": 1, "facts": facts}).encode())
    theirs: Optional[dict[str, Any]] = None
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            try:
                s.sendto(msg, (peer, port))
            except OSError:
                pass
            try:
                data, (addr, _p) = s.recvfrom(65535)
            except socket.timeout:
                continue
            payload = _verify(key, data) if addr == peer else None
            if payload is None:
                continue
            try:
                theirs = json.loads(payload)["facts"]
            except (ValueError, KeyError, TypeError):
                continue
            deadline = min(deadline, time.monotonic() + 1.0)
    finally:
        s.close()
    return theirs
