"""The fault matrix: crash points x workloads x concurrency x loss.

Every cell is a real lab: it is brought up, loaded, has its primary crashed
at the cell's point, and is checked from the client's side: every
connection byte-exact, no RST seen, never reconnected. The crash points:

* ``syn``: right after the client's SYN (the client's stack drops the SYN-ACK);
* ``synack``: after the SYN-ACK, before the client's ACK reaches the server
  (the client's stack drops everything it sends but SYNs);
* ``mid``: mid-stream, data in flight both ways;
* ``client_fin``: after the client's FIN, the server still answering (its
  FIN, and an upload's one-line answer, held at the client until the crash);
* ``server_fin``: while the server's FIN is in flight (the client's stack
  drops FINs until the crash).

The client's filters go away the instant after the crash. A cell fails if
any connection was not open at the crash: it would prove nothing. Loss is random
(``-m statistic``) on everything the backup receives on the sync link (the
clone path and the sync messages) and on the sync messages the primary
receives.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from . import lab, scenario

POINTS = ("syn", "synack", "mid", "client_fin", "server_fin")
WORKLOADS = ("echo", "down", "up", "rr", "banner")
CONNS = (1, 100)
LOSS = (0, 1, 5)
# Seconds after the crash at which the serving host's view is written down
# (see snapshot). Every connection has resumed by the first in a passing cell.
SNAPSHOT_AFTER_S = (5.0, 15.0)

# iptables rules in the client's namespace that hold connections at the crash
# point, until the crash.
_FIN_HOLD = ["INPUT", "-s", lab.VIP, "-p", "tcp", "--tcp-flags", "FIN", "FIN", "-j", "DROP"]
_HOLD = {
    "syn": [["INPUT", "-s", lab.VIP, "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP"]],
    "synack": [["OUTPUT", "-d", lab.VIP, "-p", "tcp", "!", "--syn", "-j", "DROP"]],
    "server_fin": [_FIN_HOLD],
    # After its FIN a client reads the answers (at a slow rate) while they
    # flow; the server's FIN is held so that a connection whose answers were
    # all read before the crash (loss on the clone path makes some
    # connections seconds slower than others) is still open at it.
    "client_fin": [_FIN_HOLD],
    # An upload's answer is one short line: it is held too (every server
    # segment carrying data, never a pure ACK), so that it is owed at the crash.
    "client_fin/up": [_FIN_HOLD, ["INPUT", "-s", lab.VIP, "-p", "tcp", "-m", "length", "--length", "100:65535",
                                  "-j", "DROP"]],
}


def _hold(point: str, workload: str) -> list[list[str]]:
    return _HOLD.get("%s/%s" % (point, workload)) or _HOLD.get(point, [])


@dataclass
class Cell:
    point: str
    workload: str
    conns: int
    loss: int
    ok: bool = False
    failures: list[str] = field(default_factory=list)
    gap_p50_ms: Optional[float] = None
    gap_p99_ms: Optional[float] = None
    detection_ms: Optional[float] = None
    seconds: float = 0.0
    kept: Optional[str] = None  # where a failed cell's logs, capture and report were kept

    @property
    def name(self) -> str:
        return "%s/%s/%dconn/%d%%" % (self.point, self.workload, self.conns, self.loss)


def conn_specs(point: str, workload: str, n: int) -> list[str]:
    """The traffic clients of one cell (see traffic.py for the kinds)."""
    small = n > 1
    if point == "mid":
        spec = {
            "echo": "echo:count=%d,size=2000,pause_ms=20,crash_msg=%d,after=5" % ((12, 4) if small else (30, 10)),
            # Many connections run long enough that the slowest one's
            # reaching its crash point does not outlast the fastest.
            "down": "download:bytes=%d,rate_kbps=%d,crash_at=%d" % (
                (1000000, 2000, 50000) if small else (3000000, 16000, 1000000)),
            "up": "upload:bytes=%d,rate_kbps=%d,crash_at=%d" % (
                (1000000, 2000, 50000) if small else (3000000, 16000, 1000000)),
            "rr": "rr:count=%d,size=%d,pause_ms=20,crash_msg=%d,after=5" % ((12, 6000, 4) if small else (30, 20000, 10)),
            "banner": "banner:lines=%d,pause_ms=20,crash_line=%d,after=5" % ((12, 4) if small else (30, 10)),
        }[workload]
    else:
        # The answer is held at the client until the crash (see _hold) for
        # server_fin, and for an upload's one-line answer at client_fin.
        ready = 1 if point == "server_fin" or (point, workload) == ("client_fin", "up") else 0
        rate = 1000 if small else 16000  # kbit/s of reading: answers still flowing after a client FIN
        spec = {
            # Many connections' requests fit the socket buffers (about 120 KB),
            # so that every client's FIN goes out at once, answers still owed.
            "echo": "echo:pipelined=1,count=%d,size=2000" % (60 if small else 1000),
            "down": "download:pipelined=1,bytes=%d" % (300000 if small else 3000000),
            "up": "upload:pipelined=1,bytes=%d" % (300000 if small else 3000000),
            "rr": "rr:pipelined=1,count=%d,size=%d" % ((40, 10000) if small else (60, 40000)),
            "banner": "banner:pipelined=1,lines=%d" % (3000 if small else 40000),
        }[workload] + ",ready=%d" % ready + (",rate_kbps=%d" % rate if point == "client_fin" else "")
    return [spec + ",seed=%d" % (i + 1) for i in range(n)]


def _loss(percent: int) -> None:
    if not percent:
        return
    p = "%.3f" % (percent / 100)
    lab.sh("iptables", "-w", "-t", "raw", "-I", "PREROUTING", "1", "-i", lab.SYNC_IF, "-m", "statistic",
           "--mode", "random", "--probability", p, "-j", "DROP", ns=lab.NS_BACKUP)
    lab.sh("iptables", "-w", "-t", "raw", "-I", "PREROUTING", "1", "-i", lab.SYNC_IF, "-p", "udp", "-m", "statistic",
           "--mode", "random", "--probability", p, "-j", "DROP", ns=lab.NS_PRIMARY)


def snapshot(dest_dir: str, tag: str, host: str = "backup") -> str:
    """Write the view of ``host`` (the one serving after the crash) into
    ``dest_dir``: the kernel's state of every TCP socket (``ss -tinmo``:
    windows, RTO and probe backoff, bytes unacked, time since the last send
    and ack) and the daemon's per-connection positions (its status). A cell
    is judged only when its slowest client gives up, and by then a stalled
    connection has been closed: what held it must be read while it is held.
    Errors are written into the file, never raised."""
    path = os.path.join(dest_dir, "snapshot-%s-%s.txt" % (host, tag))
    parts = []
    try:
        r = lab.sh("ss", "-tinmo", ns=lab.HOSTS[host], check=False)
        # ss leaves out snd_wnd when it is 0: a socket in persist mode with no
        # snd_wnd field is one shown a closed window.
        parts.append("## ss -tinmo (%s; no snd_wnd field means a window of 0)\n%s%s"
                     % (host, r.stdout, r.stderr))
    except Exception as e:
        parts.append("## ss failed: %s" % e)
    try:
        parts.append("## daemon status\n" + json.dumps(lab.control(host), indent=1, default=str))
    except Exception as e:
        parts.append("## daemon status failed: %s" % e)
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path


def _snapshots_after(crash_mono: float, dest_dir: str, done: threading.Event) -> None:
    for after in SNAPSHOT_AFTER_S:
        if done.wait(max(0.0, crash_mono + after - time.monotonic())):
            return
        snapshot(dest_dir, "%ds" % after)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of a non-empty list."""
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _percentile(values: list[float], q: float) -> Optional[float]:
    return round(percentile(values, q), 1) if values else None


def run_cell(point: str, workload: str, n: int, loss: int, keep_dir: Optional[str] = None,
             fast_path: bool = False) -> Cell:
    """One cell in a fresh lab. If it fails and ``keep_dir`` is given, the
    daemons' and applications' logs, the client's capture and its report are
    kept in a directory under it named after the cell."""
    cell = Cell(point, workload, n, loss)
    t0 = time.monotonic()
    hold = _hold(point, workload)
    cap_dir = tempfile.mkdtemp(prefix="sttcp-matrix-")
    report: dict[str, Any] = {}
    done = threading.Event()
    snapper: Optional[threading.Thread] = None
    try:
        lab.up(progress=lambda *_: None, fast_path=fast_path)
        _loss(loss)
        for rule in hold:
            lab.sh("iptables", "-w", "-I", *rule, ns=lab.NS_CLIENT)

        def disrupt() -> tuple[float, float]:
            nonlocal snapper
            if point == "server_fin":
                time.sleep(0.1)  # the servers' FINs are on their way (and dropped)
            t, wall = lab.crash("primary")
            for rule in hold:
                lab.sh("iptables", "-w", "-D", *rule, ns=lab.NS_CLIENT)
            if keep_dir:
                snapper = threading.Thread(target=_snapshots_after, args=(time.monotonic(), cap_dir, done),
                                           daemon=True)
                snapper.start()
            return t, wall

        specs = conn_specs(point, workload, n)
        handshake = point in ("syn", "synack")
        report = scenario.run_with_crash(specs, disrupt=disrupt, timeout=240, capture_dir=cap_dir,
                                         crash_after_ms=300 if handshake else None,
                                         start_together=not handshake)
        _judge(cell, report, n)
    except Exception as e:  # a broken cell is a failed cell, with the reason
        cell.failures.append("%s: %s" % (type(e).__name__, e))
        cell.ok = False
    finally:
        done.set()
        if snapper is not None:
            snapper.join(timeout=10)  # (never writing into cap_dir while it moves)
        if keep_dir and not cell.ok:
            cell.kept = os.path.join(keep_dir, "%s-%s-%dconn-%dpct" % (point, workload, n, loss))
            os.makedirs(cell.kept, exist_ok=True)
            with open(os.path.join(cell.kept, "report.json"), "w") as f:
                json.dump({"failures": cell.failures, "report": report}, f, indent=1, default=str)
            for name in os.listdir(cap_dir):
                shutil.move(os.path.join(cap_dir, name), cell.kept)
        lab.down(quiet=True, keep_logs=cell.kept)
        shutil.rmtree(cap_dir, ignore_errors=True)
    cell.seconds = round(time.monotonic() - t0, 1)
    return cell


def _judge(cell: Cell, report: dict[str, Any], n: int) -> None:
    conns = report.get("connections", [])
    cell.failures += connection_failures(conns, n, report.get("error"))
    st = lab.status()
    backup = st["daemons"].get("backup", {})
    if backup.get("state") != "active":
        cell.failures.append("the backup did not take over (state %s)" % backup.get("state"))
    if st["vip_owner"] != ["backup"]:
        cell.failures.append("VIP owned by %s" % st["vip_owner"])
    cell.detection_ms = (backup.get("failover") or {}).get("detection_ms")
    gaps = [c["wire_gap_ms"] for c in conns if c.get("wire_gap_ms") is not None]
    cell.gap_p50_ms, cell.gap_p99_ms = _percentile(gaps, 0.5), _percentile(gaps, 0.99)
    cell.ok = not cell.failures


def connection_failures(conns: list[dict[str, Any]], n: int, error: Optional[str] = None) -> list[str]:
    """What is wrong with a cell's connections, as the client and its capture
    saw them: every one byte-exact, no RST, one SYN, and open at the crash."""
    failures = []
    if len(conns) != n:
        failures.append("%d of %d connections reported (%s)" % (len(conns), n, error))
    done_before = 0
    for c in conns:
        label = "%s:%s" % (c["kind"], c["local_port"])
        if not c["ok"]:
            failures.append("%s: %s" % (label, c["error"]))
        if not c.get("in_capture"):
            failures.append("%s: not in the client's capture, so RSTs and SYNs are unknown" % label)
            continue
        if c["rsts_received"]:
            failures.append("%s: %d RSTs" % (label, c["rsts_received"]))
        if c["syns_sent"] > 1:
            failures.append("%s: reconnected (%d SYNs)" % (label, c["syns_sent"]))
        if not c.get("open_at_crash"):
            done_before += 1
    # A connection that was over before the crash proves nothing about failover.
    if done_before:
        failures.append("%d of %d connections were not open at the crash (over before it, or no crash time)"
                        % (done_before, len(conns)))
    return failures


def run(points=POINTS, workloads=WORKLOADS, conns=CONNS, losses=LOSS,
        progress: Callable[[str], None] = print, keep_dir: Optional[str] = None,
        fast_path: bool = False) -> list[Cell]:
    cells = [(p, w, n, lo) for lo in losses for n in conns for p in points for w in workloads]
    out = []
    for i, (p, w, n, lo) in enumerate(cells, 1):
        c = run_cell(p, w, n, lo, keep_dir, fast_path)
        out.append(c)
        progress("[%d/%d] %-34s %s  gap p50 %s, p99 %s  (%.0f s)%s" % (
            i, len(cells), c.name, "ok  " if c.ok else "FAIL", _ms(c.gap_p50_ms), _ms(c.gap_p99_ms), c.seconds,
            "" if c.ok else "\n        " + "\n        ".join(c.failures[:5] + (["kept in " + c.kept] if c.kept else []))))
    return out


def table(cells: list[Cell]) -> str:
    lines = ["%-11s %-7s %6s %5s  %-6s %9s %9s %9s" % ("point", "load", "conns", "loss", "result", "gap p50",
                                                        "gap p99", "detect")]
    for c in cells:
        lines.append("%-11s %-7s %6d %4d%%  %-6s %9s %9s %9s" % (
            c.point, c.workload, c.conns, c.loss, "ok" if c.ok else "FAIL",
            "-" if c.gap_p50_ms is None else "%.0f ms" % c.gap_p50_ms,
            "-" if c.gap_p99_ms is None else "%.0f ms" % c.gap_p99_ms,
            "-" if c.detection_ms is None else "%.0f ms" % c.detection_ms))
    n_ok = sum(c.ok for c in cells)
    lines.append("%d of %d cells passed" % (n_ok, len(cells)))
    return "\n".join(lines)


def to_json(cells: list[Cell]) -> str:
    return json.dumps([asdict(c) for c in cells], indent=2)


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else "%.0f ms" % v
