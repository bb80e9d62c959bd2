"""Run test clients in the lab and crash the primary at their crash point."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from . import lab


def run_with_crash(conns: list[str], crash: bool = True, timeout: float = 120.0,
                   before_crash=None) -> dict[str, Any]:
    """Start ``traffic`` in the client namespace with ``conns`` specs; when it
    prints CRASHPOINT, crash the primary (unless ``crash`` is False) and tell
    the client when. Returns the client's JSON report plus ``crash_t``."""
    argv = ["ip", "netns", "exec", lab.NS_CLIENT, sys.executable, "-m", "nfq_sttcp", "traffic",
            "--wait-crash", "--timeout", "30"]
    for c in conns:
        argv += ["--conn", c]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    crash_t: Optional[float] = None
    report: dict[str, Any] = {}
    try:
        assert p.stdout is not None and p.stdin is not None
        for line in p.stdout:
            line = line.strip()
            if line == "CRASHPOINT":
                if before_crash is not None:
                    before_crash()
                if crash:
                    crash_t = lab.crash("primary")
                    p.stdin.write("CRASH %.6f\n" % crash_t)
                else:
                    p.stdin.write("NOCRASH\n")
                p.stdin.flush()
            elif line.startswith("{"):
                report = json.loads(line)
        p.wait()
    finally:
        timer.cancel()
    if not report:
        err = p.stderr.read() if p.stderr else ""
        report = {"ok": False, "connections": [], "error": "client produced no report: %s" % err[-2000:]}
    report["crash_t"] = crash_t
    report["client_rc"] = p.returncode
    return report
