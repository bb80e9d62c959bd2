"""`nfq-sttcp bench`: ST-TCP against plain TCP, side by side, in the namespace lab.

Each figure is measured twice in one run through the same lab topology:
once as plain TCP (the lab's network and applications, no daemons and no
rules, the client talking to the primary's own address) and once through
nfq-sttcp (both daemons, the client talking to the VIP). Ratios and
differences are taken between the two. These machines are noisy: quote
medians and ratios, never a single absolute run.

The measuring clients run in the client's namespace (``python -m
nfq_sttcp.bench SPEC``, one JSON line out); the orchestration runs here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Optional

from . import handlercost, lab, scenario
from .matrix import percentile as _pct
from .traffic import recv_line

MB = 1 << 20
SHAPE_RATE = "1gbit"
CONNRATE_CLIENTS = 4  # processes opening connections at once (the machine has 2 CPUs)
# Enough processes at once to keep the machine's CPUs nearly busy: 4 leave
# some half a CPU idle through nfq-sttcp (each connection waits on round
# trips between the hosts), so the rate they reach is not yet what the
# service can take. The 1,000-a-second target is a capacity, so the README
# reads it on this row; the 4-client row stays, comparable with older runs.
CONNRATE_LOAD = 16
CONNRATE_ROWS = (("conn_per_s", 1), ("conn_per_s_together", CONNRATE_CLIENTS), ("conn_per_s_loaded", CONNRATE_LOAD))


# == the measuring clients (run inside the client namespace) ================

def _down(host: str, nbytes: int) -> float:
    s = socket.create_connection((host, lab.DEFAULT_PORTS[1]))
    t0 = time.perf_counter()
    s.sendall(b"%d 1 raw\n" % nbytes)  # a fixed block: the source's own cost stays out of the figure
    got = 0
    buf = bytearray(1 << 20)
    while got < nbytes:
        n = s.recv_into(buf)
        if not n:
            raise RuntimeError("short download: %d of %d bytes" % (got, nbytes))
        got += n
    dt = time.perf_counter() - t0
    s.close()
    return nbytes * 8 / dt / 1e9


def _up(host: str, nbytes: int) -> float:
    s = socket.create_connection((host, lab.DEFAULT_PORTS[1]))
    chunk = bytes(range(256)) * 256  # 64 KiB
    t0 = time.perf_counter()
    # The server only counts (testapp: discard), as the download's source
    # sends a fixed block: the application's own cost stays out of the figure.
    s.sendall(b"%d 0 discard\n" % nbytes)
    left = nbytes
    while left > 0:
        left -= s.send(chunk[:min(left, len(chunk))])
    answer = recv_line(s, 128)
    dt = time.perf_counter() - t0
    s.close()
    if answer.strip() != b"%d" % nbytes:
        raise RuntimeError("upload: the server counted %r of %d bytes" % (answer[:80], nbytes))
    return nbytes * 8 / dt / 1e9


def _rr(host: str, size: int, count: int) -> list[float]:
    """Transaction latencies in microseconds, one persistent connection."""
    s = socket.create_connection((host, lab.DEFAULT_PORTS[4]))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    req = b"%d 7\n" % size
    buf = bytearray(max(size, 1))
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendall(req)
        got = 0
        while got < size:
            n = s.recv_into(memoryview(buf)[got:])
            if not n:
                raise RuntimeError("request-response: connection closed")
            got += n
        out.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return out


def _connrate(host: str, seconds: float) -> float:
    """New connections per second, each a full echo exchange and close."""
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = socket.create_connection((host, lab.DEFAULT_PORTS[0]))
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError("echo failed")
        s.close()
        n += 1
    return n / (time.perf_counter() - t0)


def _connrate_together(host: str, seconds: float, clients: int) -> float:
    """New connections per second from ``clients`` processes at once, each
    running the loop of ``_connrate``: what the service can take, where
    ``_connrate`` alone is bound by one connection's round trips."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(clients) as pool:
        rates = pool.starmap(_connrate, [(host, seconds)] * clients)
    return sum(rates)


def _idle(host: str, count: int) -> None:
    """Open ``count`` idle echo connections, report, hold them until stdin closes."""
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, lab.DEFAULT_PORTS[0]))
        socks.append(s)
    print(json.dumps({"opened": len(socks)}), flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()


def client_main(spec: dict[str, Any]) -> Any:
    kind, host = spec["kind"], spec["host"]
    if kind == "down":
        return [_down(host, spec["bytes"]) for _ in range(spec["runs"])]
    if kind == "up":
        return [_up(host, spec["bytes"]) for _ in range(spec["runs"])]
    if kind == "rr":
        return _rr(host, spec["size"], spec["count"])
    if kind == "connrate":
        if spec.get("clients", 1) > 1:
            return _connrate_together(host, spec["seconds"], spec["clients"])
        return _connrate(host, spec["seconds"])
    if kind == "idle":
        return _idle(host, spec["count"])
    raise ValueError("unknown bench client kind %r" % kind)


def _client_argv(spec: dict[str, Any]) -> list[str]:
    return ["ip", "netns", "exec", lab.NS_CLIENT, sys.executable, "-m", "nfq_sttcp.bench", json.dumps(spec)]


def _client(spec: dict[str, Any], timeout: float = 600) -> Any:
    r = subprocess.run(_client_argv(spec), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("bench client %s failed: %s" % (spec["kind"], r.stderr.strip()[-400:]))
    return json.loads(r.stdout.strip().splitlines()[-1])


# == measurements in one lab ================================================

def _daemon_pids() -> dict[str, int]:
    pids = {}
    with open(os.path.join(lab.STATE_DIR, "pids")) as f:
        for line in f:
            host, name, pid = line.split()
            if name == "daemon":
                pids[host] = int(pid)
    # the recorded pid is `ip netns exec`'s, which execs the daemon: the same process
    return pids


def _cpu_s(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU time the whole machine spent busy (every CPU, every process and
    the kernel; not idle, I/O wait or time stolen by the hypervisor)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _cpu_stat(path: str = "/proc/stat") -> tuple[float, int]:
    """CPU time the hypervisor took from this machine, all CPUs together
    ("steal", 0 on bare metal or a kernel too old to count it), and the
    number of CPUs that line sums."""
    with open(path) as f:
        lines = f.read().splitlines()
    fields = lines[0].split()[1:]
    ncpu = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return (int(fields[7]) if len(fields) > 7 else 0) / os.sysconf("SC_CLK_TCK"), max(1, ncpu)


class _StealMeter:
    """The share of the machine's CPU time the hypervisor took during each
    step of a run. A quick run here lost a quarter of it in the steps that
    move traffic flat out, and full runs 0-4%; the same code's
    request-response figure moved by tens of microseconds between runs. A
    reader needs it to tell a slow run from a slow change. A step whose
    counts cannot be read gets no share; the run goes on."""

    def __init__(self, read: Callable[[], tuple[float, int]] = _cpu_stat,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.shares: dict[str, float] = {}
        self.read, self.clock = read, clock

    def _sample(self) -> Optional[tuple[float, float, int]]:
        try:
            stolen, ncpu = self.read()
        except (OSError, ValueError, IndexError):
            return None
        return self.clock(), stolen, ncpu

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = self._sample()
        try:
            yield
        finally:
            end = self._sample()
            if start is not None and end is not None and end[0] > start[0]:
                self.shares[name] = round((end[1] - start[1]) / ((end[0] - start[0]) * start[2]), 3)


def _rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _packets(host: str) -> int:
    """Queued packets handled: each gets one verdict (a deferred one counts at
    its defer, not again at its release); injected packets are not queued."""
    c = lab.control(host)["counters"]
    return sum(c.get("verdict_" + v, 0) for v in ("accept", "drop", "defer"))


def _ms(v: Optional[float]) -> str:
    return "unknown" if v is None else "%.1f ms" % v


def _gate_held() -> int:
    """The fast path gate's drops at the lag bound (its DROP rule's counter:
    each try TCP made counts, not each segment)."""
    out = lab.sh("iptables", "-t", "mangle", "-L", "STTCP-POUT", "-v", "-n", "-x", ns=lab.NS_PRIMARY,
                 check=False).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "primary-fast-gate" in line)


def _shape(on: bool) -> None:
    """tbf at 1 Gbit/s on both directions of the client's link."""
    for ns, dev in ((lab.NS_CLIENT, lab.CLIENT_IF), (lab.NS_LAN, "c0")):
        if on:
            lab.sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", SHAPE_RATE, "burst", "256kb",
                   "latency", "10ms", ns=ns)
        else:
            lab.sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)


def _time_wait_sockets() -> int:
    r = subprocess.run(["ip", "netns", "exec", lab.NS_CLIENT, "ss", "-Htan", "state", "time-wait"],
                       capture_output=True, text=True, check=False)
    return len(r.stdout.splitlines())


def _drain_time_wait(progress: Callable[[str], None], limit: int = 4096, timeout: float = 75.0) -> None:
    """Wait until the client's TIME-WAIT sockets are few. Plain TCP opens some
    6,500 connections a second here: a 5-second run leaves 32,000 ports of
    the client's 64,500 in TIME-WAIT for 60 s, and connect() then spends its
    time searching for a free one (the next run measured 368 a second)."""
    deadline = time.monotonic() + timeout
    n = _time_wait_sockets()
    if n > limit:
        progress("  waiting for %d client ports in TIME-WAIT to clear" % n)
    while n > limit and time.monotonic() < deadline:
        time.sleep(2)
        n = _time_wait_sockets()
    if n > limit:
        progress("  WARNING: still %d client ports in TIME-WAIT; the rate measured next is low" % n)


def _alternating(rounds: int, measure: Callable[[str], float]) -> list[list[float]]:
    """[plain, protected] per round, ``measure(host)`` back to back in one
    lab: plain TCP to the primary's own address, which no rule of ours
    matches, and protected to the VIP, alternating which goes first."""
    pairs = []
    for i in range(rounds):
        order = (lab.PRIMARY_IP, lab.VIP) if i % 2 == 0 else (lab.VIP, lab.PRIMARY_IP)
        got = {host: measure(host) for host in order}
        pairs.append([got[lab.PRIMARY_IP], got[lab.VIP]])
    return pairs


def _rr_pairs(rounds: int, count: int) -> list[list[float]]:
    """[plain p50, protected p50] per round (_alternating). Request-response
    latency swings between runs by more than the latency nfq-sttcp adds, so
    the two modes measured minutes apart (the table's rows) can even come
    out in the wrong order."""
    return _alternating(rounds, lambda host: _pct(_client({"kind": "rr", "host": host, "size": 1, "count": count}),
                                                  0.5))


def measure_mode(mode: str, sizes: dict[str, int], progress: Callable[[str], None]) -> dict[str, Any]:
    """Every steady-state figure for one mode ("plain" or "sttcp")."""
    sttcp = mode == "sttcp"
    lab.up(start_daemons=sttcp, progress=lambda *_: None)
    out: dict[str, Any] = {}
    try:
        host = lab.VIP  # plain: on the primary's LAN interface with no daemon; sttcp: the protected service
        out["congestion_control"] = lab.congestion_controls()
        pids = _daemon_pids() if sttcp else {}
        for shaped in (False, True):
            _shape(shaped)
            tag = "shaped" if shaped else "veth"
            for kind in ("down", "up"):
                progress("  %s: bulk %s, %s" % (mode, kind, "1 Gbit/s tbf" if shaped else "unshaped veth"))
                cpu0 = {h: _cpu_s(p) for h, p in pids.items()}
                pk0 = {h: _packets(h) for h in pids}
                busy0 = _busy_s()
                runs = _client({"kind": kind, "host": host, "bytes": sizes["bulk"], "runs": sizes["runs"]})
                out["%s_%s_gbps" % (kind, tag)] = statistics.median(runs)
                out["%s_%s_runs" % (kind, tag)] = runs
                if not shaped:
                    # Where the CPU goes per Gbit moved: the lab's hosts
                    # share this machine's CPUs, so this is the budget the
                    # daemons' share must fit in.
                    gbit = sizes["bulk"] * sizes["runs"] * 8 / 1e9
                    cpu = {"all": round((_busy_s() - busy0) / gbit, 4)}
                    if sttcp:
                        cpu["daemons"] = round(sum(_cpu_s(p) - cpu0[h] for h, p in pids.items()) / gbit, 4)
                    out.setdefault("cpu_s_per_gbit", {})[kind] = cpu
                    for h, p in pids.items():  # (none in plain mode)
                        n = _packets(h) - pk0[h]
                        if n:
                            out.setdefault("cpu_us_per_packet", {})["%s_%s" % (h, kind)] = round(
                                (_cpu_s(p) - cpu0[h]) / n * 1e6, 2)
        _shape(False)
        for size, count in ((1, sizes["rr_small"]), (16384, sizes["rr_large"])):
            progress("  %s: request-response, %d-byte answers" % (mode, size))
            lat = _client({"kind": "rr", "host": host, "size": size, "count": count})
            out["rr%d_p50_us" % size], out["rr%d_p99_us" % size] = _pct(lat, 0.5), _pct(lat, 0.99)
        if sttcp:
            progress("  sttcp: request-response, 1-byte answers, plain and protected alternating")
            out["rr1_pairs_us"] = _rr_pairs(sizes["rr_pairs"], sizes["rr_small"])
            if len(os.sched_getaffinity(0)) >= 2:
                # The same pairs with each server host on a CPU of its own
                # (lab.place_hosts): the part of the figure above that is
                # only the lab's hosts sharing CPUs.
                progress("  sttcp: the same pairs, each server host on CPUs of its own")
                try:
                    lab.place_hosts()
                    out["rr1_pairs_placed_us"] = _rr_pairs(sizes["rr_pairs"], sizes["rr_small"])
                finally:
                    try:
                        lab.place_hosts(separate=False)
                    except lab.LabError as e:  # (the lab goes down next anyway)
                        progress("  could not give the hosts every CPU again: %s" % e)
        for key, clients in CONNRATE_ROWS:
            # The median of a few runs: one run of the same code moved by a
            # third from one minute to the next on this VM.
            runs = []
            for i in range(sizes["connrate_runs"]):
                _drain_time_wait(progress)
                progress("  %s: new connections per second, %d client%s, run %d of %d" % (
                    mode, clients, "s at once" if clients > 1 else "", i + 1, sizes["connrate_runs"]))
                runs.append(_client({"kind": "connrate", "host": host, "seconds": sizes["connrate_s"],
                                     "clients": clients}))
            out[key], out[key + "_runs"] = statistics.median(runs), runs
    finally:
        _shape(False)
        lab.down(quiet=True)
    if sttcp:
        # A fresh lab: closed connections linger in the daemons' tables for
        # 30 s, and 10,000 of them must not weigh on the other figures.
        lab.up(progress=lambda *_: None)
        try:
            out.update(_idle_connections(lab.VIP, sizes["idle"], _daemon_pids(), progress))
        finally:
            lab.down(quiet=True)
    return out


def _idle_connections(host: str, count: int, pids: dict[str, int], progress: Callable[[str], None]) -> dict[str, Any]:
    progress("  sttcp: %d idle connections held protected" % count)
    rss0 = {h: _rss_kb(p) for h, p in pids.items()}
    p = subprocess.Popen(_client_argv({"kind": "idle", "host": host, "count": count}),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("the idle client opened no connections (file descriptor limit? see ulimit -n)")
        opened = json.loads(line)["opened"]
        deadline = time.monotonic() + 60
        protected = 0
        while time.monotonic() < deadline:  # (a fresh lab: only these connections are tracked)
            protected = lab.control("primary", timeout=10)["summary"]["protected"]
            if protected >= opened:
                break
            time.sleep(1)
        rss1 = {h: _rss_kb(pid) for h, pid in pids.items()}
    finally:
        if p.stdin:
            p.stdin.close()
        p.wait(timeout=120)
    return {"idle_opened": opened, "idle_protected": protected,
            "bytes_per_conn": {h: round((rss1[h] - rss0[h]) * 1024 / max(opened, 1)) for h in pids}}


# == the kernel fast path ====================================================

# Lag bounds (max_backup_lag_kb, max_backup_lag_ms) for the fast path's
# runs: the default, the byte bound alone, and none.
FAST_BOUNDS = ((256, 25), (256, 0), (0, 0))


def _bound_key(kb: int, ms: int) -> str:
    return "%d" % kb if not ms else "%d+%dms" % (kb, ms)


def _lag_name(key: str) -> str:
    kb, _, ms = key.partition("+")
    if not int(kb):
        return "no lag bound"
    return "lag %s KB or %s ms at the backup's pace" % (kb, ms[:-2]) if ms else "lag %s KB alone" % kb


def fast_path_runs(sizes: dict[str, int], progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Unshaped bulk transfers with the primary's kernel fast path on, for
    each lag bound in FAST_BOUNDS, against plain TCP in the same lab
    (_alternating). Also what share of the primary's segments left by the
    fast path."""
    out: dict[str, dict[str, Any]] = {}
    for kb, ms in FAST_BOUNDS:
        key = _bound_key(kb, ms)
        tag = _lag_name(key)
        lab.up(progress=lambda *_: None, fast_path=True, max_lag_kb=kb, max_lag_ms=ms)
        try:
            r: dict[str, Any] = {}
            for kind in ("down", "up"):
                progress("  fast path, %s: bulk %s, plain and protected alternating" % (tag, kind))
                fast0 = lab.control("primary").get("fast_path", {}).get("packets", 0)
                queued0, held0 = _packets("primary"), _gate_held()
                pairs = _alternating(sizes["runs"], lambda host: _client(
                    {"kind": kind, "host": host, "bytes": sizes["bulk"], "runs": 1})[0])
                fast = lab.control("primary").get("fast_path", {}).get("packets", 0) - fast0
                queued, held = _packets("primary") - queued0, _gate_held() - held0
                r[kind] = {"pairs": pairs, "fast_packets": fast, "queued_packets": queued, "held_packets": held}
            out[key] = r
        finally:
            lab.down(quiet=True)
    return out


def inbound_runs(sizes: dict[str, int], progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Unshaped bulk upload and 1-byte request-response (_rr_pairs) with
    the backup's inbound program on (the default) and off, in a lab each,
    against plain TCP in the same lab (_alternating); also how many of the
    upload's clones the kernel mapped and how many packets the backup's
    daemon handled."""
    out: dict[str, dict[str, Any]] = {}
    for key, on in (("on", True), ("off", False)):
        lab.up(progress=lambda *_: None, fast_inbound=on)
        try:
            progress("  backup's inbound program %s: bulk upload, plain and protected alternating" % key)
            mapped0 = lab.control("backup").get("fast_inbound", {}).get("packets", 0)
            queued0 = _packets("backup")
            pairs = _alternating(sizes["runs"], lambda host: _client(
                {"kind": "up", "host": host, "bytes": sizes["bulk"], "runs": 1})[0])
            time.sleep(0.3)  # (the daemon reads the kernel's count back once a tick)
            mapped = lab.control("backup").get("fast_inbound", {}).get("packets", 0) - mapped0
            out[key] = {"pairs": pairs, "kernel_mapped": mapped, "queued_packets": _packets("backup") - queued0}
            progress("  backup's inbound program %s: request-response, 1-byte answers, plain and protected "
                     "alternating" % key)
            out[key]["rr1_pairs_us"] = _rr_pairs(sizes["rr_pairs"], sizes["rr_small"])
        finally:
            lab.down(quiet=True)
    return out


# == failover gaps ===========================================================

FAILOVER_SPECS = {
    "echo": "echo:count=30,size=1000,pause_ms=10,crash_msg=10,after=15",
    # The server paces the download: paced by the client's reading, its
    # window shut and opened every 30-60 ms, and that idle time on the wire
    # passed for failover gap (10 ms x 3: 66 ms against 34 for echo). The
    # upload writes every 2 ms instead of 64 KB every 32 ms, for the same reason.
    "down": "download:bytes=4000000,rate_kbps=16000,server_pace=1,crash_at=1000000",
    "up": "upload:bytes=4000000,rate_kbps=16000,write_ms=2,crash_at=1000000",
    # Unshaped, as fast as the lab goes: the one workload whose backup runs
    # far enough behind for the lag bound to follow its pace (25 ms of 16
    # Mbit/s is 50 KB, within the 256 KB byte bound), so the one that shows
    # what that lead costs a takeover.
    "bulk": "download:bytes=300000000,crash_at=150000000",
}


def failover_runs(interval_ms: int, missed: int, crashes: int, progress: Callable[[str], None],
                  capture_dir: Optional[str] = None) -> dict[str, list[dict[str, float]]]:
    """``crashes`` crashes per workload; each gives the client's gap and the
    backup's split: detection, takeover, resume (first client segment)."""
    out: dict[str, list[dict[str, float]]] = {}
    for workload, spec in FAILOVER_SPECS.items():
        runs = out.setdefault(workload, [])
        for i in range(crashes):
            progress("  failover %d ms x %d: %s, crash %d/%d" % (interval_ms, missed, workload, i + 1, crashes))
            lab.up(interval_ms=interval_ms, missed=missed, progress=lambda *_: None)
            try:
                keep = capture_dir if (capture_dir and workload == "down" and i == 0) else None
                r = scenario.run_with_crash([spec], capture_dir=keep)
                c = r["connections"][0] if r.get("connections") else {}
                f = (lab.control("backup").get("failovers") or [{}])[-1]
                if not c.get("ok") or c.get("rsts_received") or c.get("wire_gap_ms") is None:
                    runs.append({"failed": 1.0})
                    continue
                ms = {k: None if f.get(k) is None else f[k] * 1000 for k in ("detection", "takeover", "resume")}
                runs.append({"gap_ms": c["wire_gap_ms"], "detection_ms": ms["detection"],
                             "takeover_ms": ms["takeover"], "resume_ms": ms["resume"], "crash_wall": r.get("crash_wall"),
                             "declared_wall": f.get("declared_wall"), "active_wall": f.get("active_wall")})
            finally:
                lab.down(quiet=True)
    return out


# == the whole run ==========================================================

SIZES = {"full": {"bulk": 200 * MB, "runs": 3, "rr_small": 2000, "rr_large": 500, "rr_pairs": 16,
                  "connrate_s": 5.0, "connrate_runs": 3, "idle": 10000, "crashes": 20},
         "quick": {"bulk": 20 * MB, "runs": 2, "rr_small": 300, "rr_large": 100, "rr_pairs": 2,
                   "connrate_s": 2.0, "connrate_runs": 1, "idle": 500, "crashes": 3}}


def run(quick: bool = False, out_dir: str = "bench-out", progress: Callable[[str], None] = print) -> dict[str, Any]:
    sizes = SIZES["quick" if quick else "full"]
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.monotonic()
    res: dict[str, Any] = {"sizes": sizes, "modes": {}}
    steal = _StealMeter()
    progress("[1/6] the daemons' own code per packet, without the kernel (no lab)")
    with steal.step("handlers"):
        res["handlers"] = handlercost.measure()
    for i, mode in enumerate(("plain", "sttcp"), 2):
        progress("[%d/6] steady state, %s" % (i, "plain TCP (no daemons, no rules)" if mode == "plain"
                                             else "through nfq-sttcp"))
        with steal.step(mode):
            res["modes"][mode] = measure_mode(mode, sizes, progress)
    progress("[4/6] the kernel paths: the primary's (tuning.fast_path), the backup's inbound (tuning.fast_inbound)")
    with steal.step("kernel paths"):
        res["fast_path"] = fast_path_runs(sizes, progress)
        res["fast_inbound"] = inbound_runs(sizes, progress)
    res["failover"] = {}
    for i, (interval, missed) in enumerate(((50, 3), (10, 3)), 5):
        progress("[%d/6] failover gaps, heartbeat %d ms x %d" % (i, interval, missed))
        hb = "%dx%d" % (interval, missed)
        with steal.step("failover " + hb):
            res["failover"][hb] = failover_runs(
                interval, missed, sizes["crashes"], progress, capture_dir=os.path.join(out_dir, "timeseq-%d" % interval))
    res["steal"] = steal.shares
    res["seconds"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(res, f, indent=2)
    return res


def table(res: dict[str, Any]) -> str:
    p, s = res["modes"]["plain"], res["modes"]["sttcp"]
    lines = ["%-34s %12s %12s %10s" % ("figure", "plain TCP", "nfq-sttcp", "ratio/diff")]

    def row(label: str, key: str, fmt: str = "%.3f", diff: bool = False) -> None:
        a, b = p.get(key), s.get(key)
        if a is None or b is None:
            return
        rel = ("%+.0f us" % (b - a)) if diff else ("%.2f" % (b / a if a else 0))
        lines.append("%-34s %12s %12s %10s" % (label, fmt % a, fmt % b, rel))

    row("download Gbit/s, unshaped veth", "down_veth_gbps")
    row("upload Gbit/s, unshaped veth", "up_veth_gbps")
    row("download Gbit/s, 1 Gbit/s tbf", "down_shaped_gbps")
    row("upload Gbit/s, 1 Gbit/s tbf", "up_shaped_gbps")
    row("1-byte request-response p50 us", "rr1_p50_us", "%.0f", diff=True)
    row("1-byte request-response p99 us", "rr1_p99_us", "%.0f", diff=True)
    for key, how in (("rr1_pairs_us", ""), ("rr1_pairs_placed_us", ", hosts on CPUs of their own")):
        pairs = s.get(key)
        if pairs:
            added = sorted(b - a for a, b in pairs)
            lines.append("  1-byte p50, %d alternating pairs%s: added %+.0f us median (%+.0f to %+.0f)" % (
                len(pairs), how, _pct(added, 0.5), added[0], added[-1]))
    row("16 KiB request-response p50 us", "rr16384_p50_us", "%.0f", diff=True)
    row("16 KiB request-response p99 us", "rr16384_p99_us", "%.0f", diff=True)

    def who(clients: int) -> str:
        return "%d client%s" % (clients, "s" if clients > 1 else "")

    for key, clients in CONNRATE_ROWS:
        row("new connections/s, %s" % who(clients), key, "%.0f")
    for key, clients in CONNRATE_ROWS:
        runs = {m: r.get(key + "_runs") for m, r in (("plain", p), ("nfq-sttcp", s))}
        if all(v and len(v) > 1 for v in runs.values()):
            lines.append("  new connections/s, %s, the runs (medians above): %s" % (who(clients), "; ".join(
                "%s %s" % (m, ", ".join("%.0f" % x for x in v)) for m, v in runs.items())))
    if "idle_opened" in s:
        lines.append("idle connections: %d opened, %d protected; daemon memory per connection: %s" % (
            s["idle_opened"], s["idle_protected"],
            ", ".join("%s %d B" % kv for kv in sorted(s["bytes_per_conn"].items()))))
    if "cpu_us_per_packet" in s:
        lines.append("CPU time per packet (us): %s" % ", ".join(
            "%s %.1f" % kv for kv in sorted(s["cpu_us_per_packet"].items())))
    for kind in ("down", "up"):
        a, b = p.get("cpu_s_per_gbit", {}).get(kind), s.get("cpu_s_per_gbit", {}).get(kind)
        if a and b:
            lines.append("CPU-seconds per Gbit, unshaped %s (all CPUs): plain %.3f, nfq-sttcp %.3f, of it the "
                         "daemons %.3f" % ({"down": "download", "up": "upload"}[kind], a["all"], b["all"],
                                           b.get("daemons", 0.0)))
    for lag, per in res.get("fast_path", {}).items():
        for kind, r in per.items():
            ratios = sorted(b / a for a, b in r["pairs"] if a)
            shown = r["fast_packets"] + r["queued_packets"]
            lines.append("fast path, %s, unshaped %s: %s Gbit/s against plain %s; ratio %.2f median (%.2f to %.2f); "
                         "%d%% of the primary's segments fast, %d gate drops (each try of TCP's counts)" % (
                             _lag_name(lag),
                             {"down": "download", "up": "upload"}[kind],
                             "/".join("%.1f" % b for _, b in r["pairs"]), "/".join("%.1f" % a for a, _ in r["pairs"]),
                             _pct(ratios, 0.5), ratios[0], ratios[-1],
                             round(100 * r["fast_packets"] / shown) if shown else 0, r.get("held_packets", 0)))
    for key, r in res.get("fast_inbound", {}).items():
        ratios = sorted(b / a for a, b in r["pairs"] if a)
        lines.append("backup's inbound program %s, unshaped upload: %s Gbit/s against plain %s; ratio %.2f median "
                     "(%.2f to %.2f); %d clones mapped in the kernel, %d packets through the backup's queues" % (
                         key, "/".join("%.1f" % b for _, b in r["pairs"]), "/".join("%.1f" % a for a, _ in r["pairs"]),
                         _pct(ratios, 0.5), ratios[0], ratios[-1], r["kernel_mapped"], r["queued_packets"]))
        if r.get("rr1_pairs_us"):
            added = sorted(b - a for a, b in r["rr1_pairs_us"])
            lines.append("backup's inbound program %s, 1-byte request-response: %+.0f us added at p50, median of %d "
                         "alternating pairs (%+.0f to %+.0f)" % (key, _pct(added, 0.5), len(added), added[0],
                                                                 added[-1]))
    if s.get("congestion_control"):
        lines.append("TCP congestion control: %s" % ", ".join("%s %s" % kv for kv in s["congestion_control"].items()))
    if res.get("handlers"):
        lines.append(handlercost.line(res["handlers"]))
    if res.get("steal"):
        lines.append("CPU time the hypervisor took (steal), per step: %s" % ", ".join(
            "%s %.0f%%" % (name, 100 * share) for name, share in res["steal"].items()))
    lines.append("")
    lines.append("%-10s %-6s %5s %8s %8s %10s %9s %9s" % ("heartbeat", "load", "runs", "gap p50", "gap p99",
                                                          "detect p50", "takeover", "resume"))
    for hb, per in res["failover"].items():
        for workload, runs in per.items():
            good = [r for r in runs if "gap_ms" in r]
            if not good:
                lines.append("%-10s %-6s %5d  all failed" % (hb, workload, len(runs)))
                continue
            def p50(key: str, fmt: str) -> str:  # runs that lack a time are left out, not counted as 0
                vals = [r[key] for r in good if r.get(key) is not None]
                return (fmt % _pct(vals, 0.5)) if vals else "-"

            lines.append("%-10s %-6s %5s %6.0f ms %6.0f ms %10s %9s %9s" % (
                hb, workload, "%d/%d" % (len(good), len(runs)),
                _pct([r["gap_ms"] for r in good], 0.5), _pct([r["gap_ms"] for r in good], 0.99),
                p50("detection_ms", "%.0f ms"), p50("takeover_ms", "%.1f ms"), p50("resume_ms", "%.0f ms")))
    return "\n".join(lines)


def plots(res: dict[str, Any], out_dir: str) -> list[str]:
    """PNG plots: the failover gaps, and one failover's time-sequence."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels, data = [], []
    for hb, per in res["failover"].items():
        for workload, runs in per.items():
            gaps = [r["gap_ms"] for r in runs if "gap_ms" in r]
            if gaps:
                labels.append("%s\n%s" % (workload, hb))
                data.append(gaps)
    if data:
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_ylabel("client gap across the crash (ms)")
        ax.set_title("Failover gap per workload and heartbeat (interval ms x missed beats)")
        path = os.path.join(out_dir, "failover-gaps.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        made.append(path)
    plt.close(fig)
    for hb in res["failover"]:
        interval = hb.split("x")[0]
        pcap_path = os.path.join(out_dir, "timeseq-%s" % interval, "client.pcap")
        runs = res["failover"][hb].get("down", [])
        if not os.path.exists(pcap_path) or not runs or not runs[0].get("crash_wall"):
            continue
        made.append(_timeseq_plot(pcap_path, runs[0], hb, os.path.join(out_dir, "timeseq-%s.png" % hb), plt))
    return made


def _timeseq_plot(pcap_path: str, run: dict[str, float], hb: str, path: str, plt: Any) -> str:
    from . import pcap

    t, total, t_first = [], 0, None
    for ts, linktype, frame, _orig in pcap.read_frames(pcap_path, strict=False):
        proto, off = pcap.network_layer(frame, linktype)
        pkt = frame[off:]
        if proto != 0x0800 or len(pkt) < 40 or pkt[9] != 6:
            continue
        ihl = (pkt[0] & 0xF) * 4
        src = socket.inet_ntoa(pkt[12:16])
        if src != lab.VIP:
            continue
        doff = (pkt[ihl + 12] >> 4) * 4
        n = int.from_bytes(pkt[2:4], "big") - ihl - doff
        if n <= 0:
            continue
        if t_first is None:
            t_first = ts
        total += n
        t.append((ts - t_first, total))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([x for x, _ in t], [y / MB for _, y in t], ".", markersize=2)
    if t_first is not None:
        for key, label, style in (("crash_wall", "crash", "r-"), ("declared_wall", "declared failed", "m--"),
                                  ("active_wall", "takeover done", "g:")):
            if run.get(key):
                ax.axvline(run[key] - t_first, color=style[0], linestyle=style[1:], label=label)
        ax.legend(loc="upper left")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("bytes received by the client (MiB)")
    ax.set_title("One failover, bulk download, heartbeat %s: gap %.0f ms (detection %s, takeover %s)" % (
        hb, run["gap_ms"], _ms(run.get("detection_ms")), _ms(run.get("takeover_ms"))), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(json.dumps(client_main(json.loads(sys.argv[1]))), flush=True)
