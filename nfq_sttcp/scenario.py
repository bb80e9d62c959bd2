"""Run test clients in the lab, crash the primary at their crash point, and
check the client's capture (no RST, no second SYN, the gap on the wire)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from . import lab, pcap


class Capture:
    """tcpdump in a lab namespace (by default the client's, TCP headers only)."""

    def __init__(self, path: str, ns: str = lab.NS_CLIENT, iface: str = lab.CLIENT_IF, bpf: str = "tcp",
                 snaplen: int = 96) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-s", str(snaplen), "-U", "-n", "-B", "32768",
             "-w", path, bpf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # tcpdump says "listening on" once the capture is live.
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if b"listening on" in line or not line:
                break

    def stop(self) -> list[pcap.TcpRecord]:
        self.finish()
        return list(pcap.read_tcp(self.path))

    def finish(self) -> None:
        # tcpdump starved of CPU by a burst lags behind its kernel buffer, and
        # SIGINT discards what it has not read: wait until it has caught up
        # (with -U its file grows as it reads). Without --immediate-mode the
        # kernel hands packets over in blocks, a block when it fills or after
        # libpcap's 1 s timeout: a short run's whole capture can still sit in
        # the kernel after 0.3 s of a still file. So the file must stay still
        # for longer than that timeout.
        deadline, last, still = time.monotonic() + 15, -1, 0
        while time.monotonic() < deadline and still < 13:
            time.sleep(0.1)
            size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
            still = still + 1 if size == last else 0
            last = size
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_with_crash(conns: list[str], crash: bool = True, timeout: float = 180.0,
                   before_crash: Optional[Callable[[], None]] = None, capture_dir: Optional[str] = None,
                   target: str = lab.VIP, crash_host: str = "primary",
                   disrupt: Optional[Callable[[], tuple[float, float]]] = None,
                   crash_after_ms: Optional[float] = None, start_together: bool = False) -> dict[str, Any]:
    """Start ``traffic`` in the client namespace with ``conns`` specs; when it
    prints CRASHPOINT, crash ``crash_host`` (unless ``crash`` is False) and tell
    the client when. ``disrupt`` replaces the crash (for example a switchover)
    and returns (time.monotonic(), time.time()) of its start. Returns the client's report, with per connection what
    the client's capture shows: SYNs sent, RSTs received, gap on the wire."""
    # A capture nobody asked to keep goes once it is read: a test run made
    # hundreds of these directories in /tmp before this.
    tmp = capture_dir or tempfile.mkdtemp(prefix="sttcp-cap-")
    os.makedirs(tmp, exist_ok=True)
    cap = Capture(os.path.join(tmp, "client.pcap"))
    argv = ["ip", "netns", "exec", lab.NS_CLIENT, sys.executable, "-m", "nfq_sttcp", "traffic",
            "--wait-crash", "--timeout", "30", "--target", target]
    for c in conns:
        argv += ["--conn", c]
    if crash_after_ms is not None:
        argv += ["--crash-after-ms", str(crash_after_ms)]
    if start_together:
        argv.append("--start-together")
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    crash_t: Optional[float] = None
    crash_wall: Optional[float] = None
    report: dict[str, Any] = {}
    try:
        assert p.stdout is not None and p.stdin is not None
        for line in p.stdout:
            line = line.strip()
            if line == "CRASHPOINT":
                if before_crash is not None:
                    before_crash()
                if crash:
                    crash_t, crash_wall = disrupt() if disrupt is not None else lab.crash(crash_host)
                    p.stdin.write("CRASH %.6f\n" % crash_t)
                else:
                    p.stdin.write("NOCRASH\n")
                p.stdin.flush()
            elif line.startswith("{"):
                report = json.loads(line)
        p.wait()
    finally:
        timer.cancel()
        try:
            records = cap.stop()
        finally:
            if capture_dir is None:
                shutil.rmtree(tmp, ignore_errors=True)
    if not report:
        err = p.stderr.read() if p.stderr else ""
        report = {"ok": False, "connections": [], "error": "client produced no report: %s" % err[-2000:]}
    views = pcap.client_view(records, lab.CLIENT_IP, target, crash_wall)
    for c in report["connections"]:
        v = views.get((c.get("local_port", -1), c.get("port", -1)))
        # A connection the capture lacks is unknown, not clean: None, never 0.
        c["in_capture"] = v is not None
        c["syns_sent"] = v.syns_sent if v else None
        c["rsts_received"] = v.rsts_received if v else None
        if c.get("open_at_crash") and crash_wall is not None:
            # Open at the crash: begun before it (its SYN is out) and not over.
            c["open_at_crash"] = bool(v and v.first_syn_t is not None and v.first_syn_t < crash_wall)
        # An uploading client waits for acks, and then for its one-line
        # answer; every other kind waits for data.
        c["wire_gap_ms"] = (v.any_gap_ms if c["kind"] == "upload" else v.gap_ms) if v else None
        c["wire_resume_ms"] = (v.any_resume_ms if c["kind"] == "upload" else v.resume_ms) if v else None
    report["crash_t"] = crash_t
    report["crash_wall"] = crash_wall
    report["client_rc"] = p.returncode
    report["capture"] = cap.path if capture_dir is not None else None
    report["captured_segments"] = len(records)
    return report
