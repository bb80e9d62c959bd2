"""Client side of a daemon's Unix control socket (one JSON line per request)."""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Optional


def request(path: str, command: str = "status", timeout: float = 2.0) -> dict[str, Any]:
    """Send ``command``; return the daemon's JSON answer. Raises OSError or ValueError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return json.loads(data)


def own_netns() -> Optional[int]:
    """This process's network namespace (its inode), or None."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None


def local_answer(paths: list[str], command: str = "status", timeout: float = 2.0) -> tuple[str, dict[str, Any]]:
    """(path, answer to ``command``) of the daemon in this network
    namespace, else of the first that answers. Namespaces share the file
    system: in the lab both hosts' sockets sit in one directory, and the
    backup's host asking the first socket that answered got the primary's
    status (and keepalived's notify could have reached the wrong daemon).
    Each is asked its status first, so another command goes to one daemon
    only. Raises OSError naming every socket tried when none answers."""
    mine, first, errors = own_netns(), None, []
    for path in paths:
        try:
            st = request(path, "status", timeout)
        except (OSError, ValueError) as e:
            errors.append("%s: %s" % (path, e))
            continue
        if mine is not None and st.get("netns") == mine:
            first = (path, st)
            break
        first = first or (path, st)
    if first is None:
        raise OSError("; ".join(errors))
    path, st = first
    if command == "status":
        return path, st
    try:
        return path, request(path, command, timeout)
    except ValueError as e:
        raise OSError("%s: %s" % (path, e)) from None


def serves(status: dict[str, Any]) -> bool:
    """Does this daemon serve the VIP as the primary (a primary, or a backup
    that took over and now serves a new backup)?"""
    if status.get("switchover") in ("stepping_down", "done"):
        return False
    return status.get("serving_as") == "primary" or status.get("role") == "primary"


def switchover(path: str, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the serving daemon at ``path`` to hand over to its backup, and wait
    until it has (the daemon exits once the backup serves). Returns the
    daemon's first answer, plus ``done``: True, or False with ``error``."""
    import time

    reply = request(path, "switchover")
    if not reply.get("ok"):
        return dict(reply, done=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = request(path, "status", timeout=1.0)
        except (OSError, ValueError):
            return dict(reply, done=True)  # it exited: the backup confirmed it serves
        if st.get("switchover") == "failed":
            return dict(reply, done=False, error="the backup did not take over; this host serves again")
        time.sleep(0.02)
    return dict(reply, done=False, error="no answer from the backup within %.0f s" % timeout)


def summarize(conns: list[dict[str, Any]]) -> dict[str, int]:
    """Counts over a status's connection list (the status carries them as
    "summary", since it lists at most 1,000 connections)."""
    n = sum(1 for c in conns if c.get("protected"))
    closed = sum(1 for c in conns if c.get("closed") and not c.get("protected"))
    return {"connections": len(conns), "protected": n, "unprotected": len(conns) - n - closed, "closed": closed,
            "held_bytes": sum(c.get("held_bytes", 0) for c in conns)}


def first_unprotected(conns: list[Any], limit: Optional[int]) -> list[Any]:
    """``conns``, cut to ``limit`` with the unprotected kept first: a status of
    10,000 connections took the loop 25-65 ms to build, long enough to delay
    heartbeats, while the reply lists at most 1,000 of them."""
    if limit is None or len(conns) <= limit:
        return conns
    chosen = [c for c in conns if not c.protected][:limit]
    return chosen + [c for c in conns if c.protected][:limit - len(chosen)]


HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"
EXIT_CODES = {HEALTHY: 0, DEGRADED: 1, DOWN: 2}


def health(status: dict[str, Any]) -> tuple[str, list[str]]:
    """Judge a daemon's status: (healthy|degraded|down, why not healthy).

    Healthy means every connection would survive a crash now: a serving daemon
    with a following backup and nothing unprotected, or a backup following a
    live primary. Down means this daemon protects nothing and serves nothing."""
    why: list[str] = []
    state = status.get("state")
    if state == "fault":
        return DOWN, ["the takeover failed (state fault)"]
    if serves(status) or status.get("switchover"):
        if status.get("backup") != "present":
            why.append("no backup follows (backup %s)" % status.get("backup"))
    elif state != "following":
        why.append({"waiting": "no primary heard yet", "suspect": "the primary missed heartbeats",
                    "orphaned": "the primary's daemon is silent while its host answers: protection suspended",
                    "takeover": "taking over"}.get(str(state), "state %s" % state))
    if status.get("oversize_links"):
        why.append("BIG TCP packets over 64 KB on %s: their connections go unprotected (set the link's "
                   "gso_ipv4_max_size and gro_ipv4_max_size back to 65536)" % ", ".join(status["oversize_links"]))
    # (A closed connection lingers a while, with nothing left to lose.)
    unprotected = [c for c in status.get("connections", []) if not c.get("protected") and not c.get("closed")]
    count = status.get("summary", {}).get("unprotected", len(unprotected))  # (the list may be cut short)
    if count:
        reasons = sorted({str(c.get("reason")) for c in unprotected})
        why.append("%d connection(s) unprotected: %s" % (count, "; ".join(reasons)))
    return (DEGRADED if why else HEALTHY), why
