"""The iptables rule set of each role, rendered from the config (pure).

Rules live only in chains we own (``<prefix>-...``); the built-in chains get a
single jump each. The output is ``iptables-restore --noflush`` input, and the
files in ``iptables/`` are exactly this output for the lab config.

* Primary: clone client segments to the backup (mangle PREROUTING, TEE) and
  queue its own client-bound segments (mangle POSTROUTING) with
  ``--queue-bypass``: a dead handler means lost protection, not lost service.
  With the kernel fast path, its matches go in front of the queue rule, and
  a chain of its own in mangle PREROUTING (``-PIN``) keeps the clients'
  acks for it (fastpath.py); without, there is no such chain.
* Backup: queue client segments before conntrack (raw PREROUTING) and its own
  replies (mangle POSTROUTING) without bypass: a dead handler must never leak
  an unmapped reply to the client (fail closed).
Packets we inject carry the mark and skip every queue (DESIGN.md trap 18).

One queue per hook, not ``--queue-balance``: its hash covers only the two
addresses and the protocol (``hash_v4`` in the kernel's nf_queue.h), so all
of one client's connections land in the same queue, and spreading them
would need a worker per queue sharing the sync state.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import fastpath
from .config import Config

ROLES = ("primary", "backup")


@dataclass(frozen=True)
class Hook:
    table: str
    builtin: str
    chain: str


def hooks(cfg: Config, role: str) -> list[Hook]:
    p = cfg.chain_prefix
    if role == "primary":
        return [Hook("mangle", "PREROUTING", p + "-TEE"), Hook("mangle", "POSTROUTING", p + "-POUT"),
                Hook("mangle", "PREROUTING", p + "-PIN")]
    if role == "backup":
        return [Hook("raw", "PREROUTING", p + "-BIN"), Hook("mangle", "POSTROUTING", p + "-BOUT")]
    raise ValueError("role must be primary or backup")


def all_hooks(cfg: Config) -> list[Hook]:
    return hooks(cfg, "primary") + hooks(cfg, "backup")


def _port_chunks(ports: tuple[int, ...]) -> list[str]:
    ps = sorted(ports)
    return [",".join(str(x) for x in ps[i:i + 15]) for i in range(0, len(ps), 15)]


def _tee_rules(cfg: Config, chain: str) -> list[str]:
    return ["-A %s -i %s -d %s/32 -p tcp -m multiport --dports %s -j TEE --gateway %s"
            % (chain, cfg.lan_interface, cfg.vip, ports, cfg.backup_sync) for ports in _port_chunks(cfg.ports)]


def render_cloning(cfg: Config, on: bool) -> str:
    """Replace the primary's clone rules atomically (declaring the chain flushes it).

    The primary clones only to a backup that follows it: a backup host whose
    daemon is not running would answer the clones from its own stack.
    """
    tee = hooks(cfg, "primary")[0]
    lines = ["*mangle", ":%s - [0:0]" % tee.chain] + (_tee_rules(cfg, tee.chain) if on else []) + ["COMMIT"]
    return "\n".join(lines) + "\n"


def render_clone_hook(cfg: Config) -> str:
    """The primary's clone chain, empty, and the jump into it: what a backup
    adds when it takes over and starts serving as the primary."""
    tee = hooks(cfg, "primary")[0]
    return "*%s\n:%s - [0:0]\n-I %s 1 -j %s\nCOMMIT\n" % (tee.table, tee.chain, tee.builtin, tee.chain)


def render(cfg: Config, role: str, fence: bool = False, clone: bool = True,
           jumps_present: frozenset[str] = frozenset(), fast_prog: str | None = None) -> str:
    """iptables-restore input for ``role``.

    ``fence=True`` renders a silenced server: its replies are dropped
    outright. A backup's daemon leaves it when it exits; a primary that
    stepped down for a switchover leaves it (with its clone rules) too. ``clone=False``
    leaves the primary's clone chain empty (the daemon fills it once a backup
    follows). ``fast_prog``, the pinned path of the primary's fast-path
    program (fastpath.py), puts its matches in front of the queue rule and
    its recorder in the ``-PIN`` chain; only the daemon renders them, while
    its programs are loaded. Without them the ``-PIN`` chain is left out, or
    emptied if an earlier run left its jump.
    """
    hs = hooks(cfg, role)
    mark = "-m mark ! --mark 0x%x" % cfg.mark
    vip = cfg.vip + "/32"
    body: dict[str, list[str]] = {}
    if role == "primary":
        tee, out, pin = hs
        if fast_prog is None and pin.chain not in jumps_present:
            hs = [tee, out]
    for h in hs:
        body.setdefault(h.table, []).append(":%s - [0:0]" % h.chain)
    for h in hs:
        if h.chain not in jumps_present:  # declaring a chain flushes it; its jump stays
            body[h.table].append("-I %s 1 -j %s" % (h.builtin, h.chain))
    if role == "primary":
        if clone:
            body["mangle"] += _tee_rules(cfg, tee.chain)
        for ports in _port_chunks(cfg.ports):
            if fence:
                body["mangle"].append("-A %s -s %s -p tcp -m multiport --sports %s -j DROP" % (out.chain, vip, ports))
            else:
                if fast_prog is not None:
                    before_queue, recording = fastpath.rules(out.chain, pin.chain, cfg.lan_interface, cfg.vip, ports,
                                                             cfg.mark, fastpath.Pins(fast_prog))
                    body["mangle"] += before_queue + recording
                body["mangle"].append("-A %s -s %s -p tcp -m multiport --sports %s %s -j NFQUEUE --queue-num %d "
                                      "--queue-bypass" % (out.chain, vip, ports, mark, cfg.queue_primary_out))
    else:
        bin_, bout = hs
        for ports in _port_chunks(cfg.ports):
            if not fence:
                body["raw"].append("-A %s -d %s -p tcp -m multiport --dports %s %s -j NFQUEUE --queue-num %d"
                                   % (bin_.chain, vip, ports, mark, cfg.queue_backup_in))
                body["mangle"].append("-A %s -s %s -p tcp -m multiport --sports %s %s -j NFQUEUE --queue-num %d"
                                      % (bout.chain, vip, ports, mark, cfg.queue_backup_out))
            else:
                body["mangle"].append("-A %s -s %s -p tcp -m multiport --sports %s -j DROP"
                                      % (bout.chain, vip, ports))
    out_lines = ["# nfq-sttcp %s rules%s (rendered from %s)" % (role, " (exit fence)" if fence else "", cfg.source)]
    for table in ("raw", "mangle"):
        if table in body:
            out_lines.append("*" + table)
            out_lines.extend(body[table])
            out_lines.append("COMMIT")
    return "\n".join(out_lines) + "\n"
