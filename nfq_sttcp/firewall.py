"""Applying and removing our rule sets (the only place that runs iptables).

Setup starts by tearing down, so applying twice does no harm; teardown keeps
going past errors, so removing twice does no harm either. Only chains we own
and the jumps into them are ever touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

from . import nfqueue
from .config import Config
from .control import own_netns
from .rules import Hook, all_hooks, hooks, render, render_clone_hook, render_cloning


class FirewallError(RuntimeError):
    pass


def _iptables(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)


_FEATURES = {
    "NFQUEUE": "the NFQUEUE target (CONFIG_NETFILTER_XT_TARGET_NFQUEUE)",
    "TEE": "the TEE target (CONFIG_NETFILTER_XT_TARGET_TEE)",
    "multiport": "the multiport match (CONFIG_NETFILTER_XT_MATCH_MULTIPORT)",
    "mark": "the mark match (CONFIG_NETFILTER_XT_MATCH_MARK)",
    "bpf": "the bpf match, for tuning.fast_path (CONFIG_NETFILTER_XT_MATCH_BPF)",
}


def require_iptables() -> None:
    for tool in ("iptables", "iptables-restore", "iptables-save"):
        if shutil.which(tool) is None:
            raise FirewallError("%s not found: install the iptables package (iptables-nft)" % tool)


def explain_restore_error(stderr: str) -> str:
    """Name the missing kernel feature when iptables-restore says so."""
    for word, feature in _FEATURES.items():
        if ("`%s'" % word) in stderr or ('"%s"' % word) in stderr or (" %s:" % word) in stderr:
            return "the kernel lacks %s: %s" % (feature, stderr.strip().splitlines()[0] if stderr.strip() else "")
    if "Permission denied" in stderr or "Operation not permitted" in stderr:
        return "not permitted to change iptables rules: run as root (CAP_NET_ADMIN)"
    return stderr.strip()


def teardown_hooks(hs: list[Hook]) -> list[str]:
    errors: list[str] = []
    for h in hs:
        for _ in range(64):  # remove every jump, however many accumulated
            if _iptables("iptables", "-w", "-t", h.table, "-D", h.builtin, "-j", h.chain).returncode != 0:
                break
        exists = _iptables("iptables", "-w", "-t", h.table, "-n", "-L", h.chain).returncode == 0
        if not exists:
            continue
        for cmd in (("-F", h.chain), ("-X", h.chain)):
            r = _iptables("iptables", "-w", "-t", h.table, *cmd)
            if r.returncode != 0:
                errors.append("%s %s: %s" % (h.table, " ".join(cmd), r.stderr.strip()))
    return errors


def _jump_present(h: Hook) -> bool:
    return _iptables("iptables", "-w", "-t", h.table, "-C", h.builtin, "-j", h.chain).returncode == 0


def apply(cfg: Config, role: str, fence: bool = False, clone: bool = True, fast_prog: str | None = None) -> None:
    """Replace the role's rules in one transaction: chains that exist are
    flushed and refilled, never left empty in between. (A backup restarting
    over its exit fence must not have a moment without it: its stack would
    answer clones still in flight.)"""
    require_iptables()
    present = frozenset(h.chain for h in hooks(cfg, role) if _jump_present(h))
    r = _iptables("iptables-restore", "-w", "--noflush",
                  stdin=render(cfg, role, fence=fence, clone=clone, jumps_present=present, fast_prog=fast_prog))
    if r.returncode != 0:
        teardown_hooks(hooks(cfg, role))
        raise FirewallError("iptables-restore refused the %s rules: %s" % (role, explain_restore_error(r.stderr)))


def set_cloning(cfg: Config, on: bool) -> None:
    r = _iptables("iptables-restore", "-w", "--noflush", stdin=render_cloning(cfg, on))
    if r.returncode != 0:
        raise FirewallError("iptables-restore refused the clone rules: %s" % explain_restore_error(r.stderr))


def add_clone_hook(cfg: Config) -> None:
    """The primary's clone chain and its jump, empty (a backup promoted to primary)."""
    tee = hooks(cfg, "primary")[0]
    teardown_hooks([tee])
    r = _iptables("iptables-restore", "-w", "--noflush", stdin=render_clone_hook(cfg))
    if r.returncode != 0:
        raise FirewallError("iptables-restore refused the clone hook: %s" % explain_restore_error(r.stderr))


def remove(cfg: Config, role: str) -> list[str]:
    require_iptables()
    return teardown_hooks(hooks(cfg, role))


def remove_all(cfg: Config) -> list[str]:
    require_iptables()
    return teardown_hooks(all_hooks(cfg))


def show(cfg: Config) -> str:
    require_iptables()
    lines: list[str] = []
    for table in ("raw", "mangle"):
        r = _iptables("iptables-save", "-t", table)
        for line in r.stdout.splitlines():
            if cfg.chain_prefix + "-" in line:
                lines.append("[%s] %s" % (table, line))
    return "\n".join(lines)


# -- tc: the backup's inbound program (fastin.py) -------------------------------

TC_PREF = 0x5717  # our filter's priority on the ingress hook: the only one we touch


def queue_packet_sizes(ifnames: list[Optional[str]]) -> dict[str, Optional[dict[str, int]]]:
    """The BIG TCP sizes (nfqueue.parse_link_sizes) of each link named and
    of the links beneath it (nfqueue.links_beneath); None for one that
    cannot be read. A name that is no link here is left out."""
    return link_packet_sizes(queue_links(ifnames))


def queue_links(ifnames: list[Optional[str]]) -> dict[str, int]:
    """Each link named and the links beneath it (nfqueue.links_beneath), by
    name, with its index; {} when the links cannot be listed."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            links = [(link["index"], link.get_attr("IFLA_IFNAME"),
                      None if link.get_attr("IFLA_LINK_NETNSID") is not None else link.get_attr("IFLA_LINK"),
                      link.get_attr("IFLA_MASTER")) for link in ipr.get_links()]
    except OSError:
        return {}
    names: list[str] = []
    for ifname in ifnames:
        if ifname:
            names += [n for n in nfqueue.links_beneath(links, ifname) if n not in names]
    index_of = {n: i for i, n, _p, _m in links}
    return {n: index_of[n] for n in names}


def link_packet_sizes(index_of: dict[str, int], timeout: float = 2.0) -> dict[str, Optional[dict[str, int]]]:
    """The BIG TCP sizes of each link given by index; None for one that
    cannot be read (gone, or a kernel without them). One request a link,
    well under a millisecond: cheap enough for the daemon to repeat."""
    import socket

    # Read by our own request: pyroute2 (0.9.7) knows no attribute past
    # IFLA_ALLMULTI and gives these as UNKNOWN without their value, and
    # iproute2 before 6.3 (Debian 12 has 6.1) neither shows nor sets them.
    out: dict[str, Optional[dict[str, int]]] = {}
    for n, index in index_of.items():
        try:
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:  # (0: NETLINK_ROUTE)
                s.settimeout(timeout)
                s.sendto(nfqueue.getlink_request(index, 1), (0, 0))
                got = None
                while got is None:
                    got = nfqueue.parse_link_sizes(s.recv(65536), 1)
                out[n] = got
        except OSError:
            out[n] = None
    return out


def _tc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(("tc",) + args, capture_output=True, text=True, check=False)


def tc_attach_ingress(ifname: str, pinned: str, marker: Optional[str] = None) -> bool:
    """Attach the pinned tc program at ``ifname``'s ingress (direct action),
    in place of one a killed daemon left. Returns whether the clsact qdisc is
    ours to remove: we added it, or a killed daemon of ours did (``marker``:
    qdisc_marker)."""
    if shutil.which("tc") is None:
        raise FirewallError("tc not found: install the iproute2 package")
    shown = _tc("qdisc", "show", "dev", ifname)
    if shown.returncode != 0:
        raise FirewallError("cannot read the qdiscs of %s: %s" % (ifname, shown.stderr.strip()))
    added = False
    if "qdisc clsact" not in shown.stdout:
        if "qdisc ingress" in shown.stdout:
            raise FirewallError("%s has an ingress qdisc: the inbound program needs clsact in its place" % ifname)
        # (One that exists already fails with "Exclusivity flag on", not "exists": hence the look first.)
        r = _tc("qdisc", "add", "dev", ifname, "clsact")
        if r.returncode != 0:
            raise FirewallError("cannot add a clsact qdisc on %s: %s" % (ifname, r.stderr.strip()))
        added = True
        _write_marker(marker, ifname)
    elif _marked(marker, ifname):
        added = True  # a killed daemon of ours added it
    _tc("filter", "del", "dev", ifname, "ingress", "pref", str(TC_PREF))  # (a killed daemon's)
    r = _tc("filter", "add", "dev", ifname, "ingress", "pref", str(TC_PREF), "handle", "1",
            "bpf", "object-pinned", pinned, "direct-action")
    if r.returncode != 0:
        if added:
            _remove_qdisc(ifname, marker)
        raise FirewallError("cannot attach the inbound program on %s: %s" % (ifname, r.stderr.strip()))
    return added


def qdisc_marker(control_dir: str, ifname: str) -> str:
    """The file a backup daemon keeps while a clsact qdisc it added on
    ``ifname`` stands. Nothing in a qdisc says who added it: without this, a
    killed daemon's stayed for good, as it could be anyone's."""
    return os.path.join(control_dir, "clsact-%s" % ifname)


def _link_identity(ifname: str) -> Optional[str]:
    """This network namespace and the link's index: the file names a link
    by name, and namespaces share /run (the lab's two hosts both have a
    sync0), and a link deleted and made again keeps its name."""
    netns = own_netns()
    try:
        with open("/sys/class/net/%s/ifindex" % ifname) as f:
            index = f.read().strip()
    except OSError:
        return None
    return None if netns is None else "netns %d ifindex %s\n" % (netns, index)


def _write_marker(marker: Optional[str], ifname: str) -> None:
    ident = _link_identity(ifname)
    if marker is None or ident is None:
        return
    try:
        with open(marker, "w") as f:
            f.write(ident)
    except OSError:
        pass  # (a killed daemon's qdisc then stays, as it always did)


def _marked(marker: Optional[str], ifname: str) -> bool:
    """The file says we added the clsact qdisc on this very link."""
    if marker is None:
        return False
    try:
        with open(marker) as f:
            return f.read() == _link_identity(ifname)
    except OSError:
        return False


def _remove_qdisc(ifname: str, marker: Optional[str]) -> None:
    """Remove the clsact qdisc we added, unless someone has put filters of
    their own on it since (or we cannot tell). The file goes with the qdisc."""
    shows = [_tc("filter", "show", "dev", ifname, hook) for hook in ("ingress", "egress")]
    if any(r.returncode != 0 or r.stdout.strip() for r in shows):
        return
    _tc("qdisc", "del", "dev", ifname, "clsact")
    if marker is not None and "qdisc clsact" not in _tc("qdisc", "show", "dev", ifname).stdout:
        try:
            os.unlink(marker)
        except OSError:
            pass


def tc_detach_ingress(ifname: str, remove_qdisc: bool, marker: Optional[str] = None) -> None:
    """Undo tc_attach_ingress (keeps going past errors: the link may be gone)."""
    _tc("filter", "del", "dev", ifname, "ingress", "pref", str(TC_PREF))
    if remove_qdisc:
        _remove_qdisc(ifname, marker)


def tc_detach_everywhere(control_dirs: tuple[str, ...] = ()) -> None:
    """Remove our inbound filter from every interface here: one a killed
    backup daemon left goes on mapping and marking clones. Also the clsact
    qdiscs such a daemon added, where a file in ``control_dirs`` says so."""
    if shutil.which("tc") is None:
        return
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return
    for ifname in names:
        _tc("filter", "del", "dev", ifname, "ingress", "pref", str(TC_PREF))
        for d in control_dirs:
            marker = qdisc_marker(d, ifname)
            if _marked(marker, ifname):
                _remove_qdisc(ifname, marker)
