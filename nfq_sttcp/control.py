"""Client side of a daemon's Unix control socket (one JSON line per request)."""

from __future__ import annotations

import json
import socket
from typing import Any


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
