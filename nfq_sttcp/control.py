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
