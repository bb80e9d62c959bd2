"""What the daemons' own code costs per packet, without the kernel: a primary
and a backup Daemon wired to each other through in-memory sockets and fed
made-up queued packets of one connection (no namespace, no queue, no root).

The lab's figure (bench.py, "CPU time per packet") adds the kernel's share
to this: the copy of each packet to the daemon, the verdict that carries it
on through the stack, the wake-ups. That share swings with the machine by
more than a change to the per-packet Python (the driver's callbacks, the
cores, the sync messages) moves it. Measure such a change here, before and
after, alternately: on a shared VM the same code's figure still moves by a
fifth from one process to the next.

Three workloads, each in lockstep (every packet one host's stack would queue,
in the order the hosts would see them):

* download: the primary's 64 KB segment, the backup's copy of it, a client
  ack every second segment (the backup maps it: the lab's inbound program
  leaves pure acks to the daemon too), the backup's confirmations to the
  primary at most every millisecond as the driver sends them;
* request-response: a client request (the backup maps its clone), the
  primary's 1-byte answer (its ack clamped to what the backup confirmed),
  the backup's copy of the answer (held), the client's ack, and the
  confirmations;
* connections: short connections one after another (the handshake, one
  echo byte, both FINs), the figure per connection: the Python share of
  what the bench's connection storm costs each daemon.

Sync messages cross as they would, HMAC and all; heartbeats go when due.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Any, Callable

import structlog

from . import tcpseg
from .config import Config
from .seqmath import seq_add, seq_sub

CLIENT, VIP = "192.0.2.10", "192.0.2.100"  # (nothing is sent: the sockets are in memory)
CPORT, SPORT = 40000, 7000
ISN_C, ISN_P, ISN_B, TS_C, TS_P, TS_B = 1000, 50000, 900000, 100, 777, 12345
SEGMENT = 65000


class _Queued:
    """A queued packet as NetfilterQueue hands it over."""

    __slots__ = ("data", "verdict")

    def __init__(self, data: bytes) -> None:
        self.data, self.verdict = data, ""

    def get_payload(self) -> bytes:
        return self.data

    def set_payload(self, data: bytes) -> None:
        self.data = data

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


class _Wire:
    """One host's sync socket: what it sends, the other host receives, from
    the address of the path it went by (the sync link or the LAN)."""

    def __init__(self, source_for: dict[str, str]) -> None:
        self.source_for = source_for  # destination -> our address on that path
        self.inbox: collections.deque[tuple[bytes, tuple[str, int]]] = collections.deque()
        self.peer: "_Wire | None" = None
        self.sent = 0

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.sent += 1
        if self.peer is not None:
            self.peer.inbox.append((data, (self.source_for[addr[0]], 0)))
        return len(data)

    def recvfrom(self, _n: int) -> tuple[bytes, tuple[str, int]]:
        if not self.inbox:
            raise BlockingIOError
        return self.inbox.popleft()


class _Injector:
    def __init__(self) -> None:
        self.sent = 0

    def sendto(self, data: bytes, _addr: Any) -> int:
        self.sent += 1
        return len(data)


class _Cloning:
    def set(self, _on: bool) -> None:
        pass


def _config() -> Config:
    return Config(vip=VIP, ports=(SPORT,), lan_interface="lan0", primary_sync="198.51.100.1",
                  backup_sync="198.51.100.2", primary_lan="192.0.2.1", backup_lan="192.0.2.2",
                  fast_inbound=False, source="handlercost")


def _pair() -> tuple[Any, Any]:
    from .driver import Daemon  # (a heavy import: only when measuring)

    cfg = _config()
    quiet = structlog.wrap_logger(None, wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    p, b = Daemon(cfg, "primary"), Daemon(cfg, "backup")
    for d, role, peer in ((p, "primary", "backup"), (b, "backup", "primary")):
        d.key = b"handlercost-key-" * 2  # (signed as the lab's are)
        d.sync = _Wire(dict(zip(cfg.peer_addresses(role), cfg.own_addresses(role))))
        d.raw, d.log = _Injector(), quiet
    p.sync.peer, b.sync.peer = b.sync, p.sync
    p._cloning = _Cloning()
    p.primary.backup_following = True
    return p, b


def _from_client(seq: int, ack: int, flags: int = tcpseg.ACK, payload: bytes = b"", tsval: int = TS_C,
                 tsecr: int = 0, opts: bytes = b"", cport: int = CPORT) -> bytes:
    return tcpseg.build_segment(CLIENT, VIP, cport, SPORT, seq, ack, flags, 20000,
                                opts or tcpseg.ts_option(tsval, tsecr), payload)


def _from_server(seq: int, ack: int, flags: int = tcpseg.ACK, payload: bytes = b"", tsval: int = 0,
                 opts: bytes = b"", cport: int = CPORT) -> bytes:
    return tcpseg.build_segment(VIP, CLIENT, SPORT, cport, seq, ack, flags, 3000,
                                opts or tcpseg.ts_option(tsval, TS_C), payload)


def _syn_opts(tsval: int, tsecr: int) -> bytes:
    return bytes([2, 4, 5, 0xB4, 4, 2, 8, 10]) + tsval.to_bytes(4, "big") + tsecr.to_bytes(4, "big") + \
        bytes([1, 3, 3, 7])


def _connect(p: Any, b: Any) -> None:
    """The handshake, as both daemons see it; raise if it did not map."""
    b._cb_backup_in(_Queued(_from_client(ISN_C, 0, tcpseg.SYN, opts=_syn_opts(TS_C, 0))))
    p._cb_primary_out(_Queued(_from_server(ISN_P, ISN_C + 1, tcpseg.SYN | tcpseg.ACK, opts=_syn_opts(TS_P, TS_C))))
    b._on_sync_readable()
    b._cb_backup_out(_Queued(_from_server(ISN_B, ISN_C + 1, tcpseg.SYN | tcpseg.ACK, opts=_syn_opts(TS_B, TS_C))))
    b._batch_end()
    p._on_sync_readable()
    b._cb_backup_in(_Queued(_from_client(ISN_C + 1, ISN_P + 1, tsecr=TS_P)))
    conn = b.backup.conns.get((CLIENT, CPORT, VIP, SPORT))
    if conn is None or conn.delta_seq is None:
        raise RuntimeError("handlercost: the made-up handshake was not mapped")


class _Clock:
    """CPU per host: this thread's CPU time in the calls made on its behalf
    (not wall-clock time: a preemption or the hypervisor's steal would count)."""

    def __init__(self) -> None:
        self.s = {"primary": 0.0, "backup": 0.0}

    def on(self, host: str, call: Callable[..., Any], *args: Any) -> None:
        t0 = time.thread_time()
        call(*args)
        self.s[host] += time.thread_time() - t0


def _confirmations(clock: _Clock, p: Any, b: Any) -> None:
    clock.on("backup", b._batch_end)  # (confirms at most every CONFIRM_EVERY_S, as in the daemon)
    if p.sync.inbox:  # (the loop reads the sync socket only when select says so)
        clock.on("primary", p._on_sync_readable)
    clock.on("primary", p._batch_end)
    if b.sync.inbox:
        clock.on("backup", b._on_sync_readable)


def _settle(p: Any, b: Any) -> None:
    """The last confirmations, off the clock: nothing stays held at the end."""
    from .driver import CONFIRM_EVERY_S

    for _ in range(2):
        time.sleep(CONFIRM_EVERY_S)
        _confirmations(_Clock(), p, b)


def download(n: int = 3000) -> dict[str, Any]:
    p, b = _pair()
    _connect(p, b)
    c = seq_add(ISN_C, 1)
    body = bytes(SEGMENT)
    clock, packets = _Clock(), {"primary": 0, "backup": 0}
    for i in range(n):
        # (built outside the clock: making packets is not the daemons' work)
        ps = _Queued(_from_server(seq_add(ISN_P, 1 + i * SEGMENT), c, payload=body, tsval=TS_P + i))
        bs = _Queued(_from_server(seq_add(ISN_B, 1 + i * SEGMENT), c, payload=body, tsval=TS_B + i))
        ack = _Queued(_from_client(c, seq_add(ISN_P, 1 + i * SEGMENT), tsval=TS_C + i, tsecr=TS_P + i)) \
            if i % 2 else None
        clock.on("primary", p._cb_primary_out, ps)
        clock.on("backup", b._cb_backup_out, bs)
        packets["primary"] += 1
        packets["backup"] += 1
        if ack is not None:
            clock.on("backup", b._cb_backup_in, ack)
            packets["backup"] += 1
        if i % 8 == 7:
            _confirmations(clock, p, b)
    _settle(p, b)
    return _result(clock, packets, p, b)


def request_response(n: int = 3000) -> dict[str, Any]:
    p, b = _pair()
    _connect(p, b)
    c, s_p, s_b = seq_add(ISN_C, 1), seq_add(ISN_P, 1), seq_add(ISN_B, 1)
    req = b"1 7\n"
    clock, packets = _Clock(), {"primary": 0, "backup": 0}
    for i in range(n):
        c_end = seq_add(c, len(req))
        q = _Queued(_from_client(c, s_p, tcpseg.ACK | tcpseg.PSH, req, tsval=TS_C + 2 * i, tsecr=TS_P + i))
        pa = _Queued(_from_server(s_p, c_end, tcpseg.ACK | tcpseg.PSH, b"r", tsval=TS_P + i + 1))
        ba = _Queued(_from_server(s_b, c_end, tcpseg.ACK | tcpseg.PSH, b"r", tsval=TS_B + i + 1))
        ca = _Queued(_from_client(c_end, seq_add(s_p, 1), tsval=TS_C + 2 * i + 1, tsecr=TS_P + i + 1))
        clock.on("backup", b._cb_backup_in, q)
        clock.on("primary", p._cb_primary_out, pa)
        clock.on("backup", b._cb_backup_out, ba)
        clock.on("backup", b._cb_backup_in, ca)
        packets["primary"] += 1
        packets["backup"] += 3
        _confirmations(clock, p, b)
        c, s_p, s_b = c_end, seq_add(s_p, 1), seq_add(s_b, 1)
    _settle(p, b)
    return _result(clock, packets, p, b)


def connections(n: int = 1000) -> dict[str, Any]:
    """Short connections one after another, as the bench's connection storm
    makes them: the handshake, a 1-byte request and its echo, the client's
    FIN, both servers' FINs and the client's last ack; the confirmations as
    the driver sends them. The figure is per connection."""
    if not 0 < n <= 40000:
        raise ValueError("connections: n must be 1 to 40000 (one client port each)")
    p, b = _pair()
    clock, packets = _Clock(), {"primary": 0, "backup": 0}
    A, AP, S, F = tcpseg.ACK, tcpseg.ACK | tcpseg.PSH, tcpseg.SYN, tcpseg.ACK | tcpseg.FIN
    for i in range(n):
        cp, t = 20000 + i, TS_C + 10 * i
        c0, p0, b0 = seq_add(ISN_C, i * 7919), seq_add(ISN_P, i * 104729), seq_add(ISN_B, i * 1299709)
        c1, c2, c3 = seq_add(c0, 1), seq_add(c0, 2), seq_add(c0, 3)

        def cl(seq: int, ack: int, flags: int = A, payload: bytes = b"", tsval: int = 0, tsecr: int = 0,
               opts: bytes = b"", cp: int = cp) -> _Queued:
            return _Queued(_from_client(seq, ack, flags, payload, tsval, tsecr, opts, cport=cp))

        def sv(seq: int, ack: int, flags: int = A, payload: bytes = b"", tsval: int = 0, opts: bytes = b"",
               cp: int = cp) -> _Queued:
            return _Queued(_from_server(seq, ack, flags, payload, tsval, opts, cport=cp))

        # (built outside the clock: making packets is not the daemons' work)
        steps: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
            ("backup", b._cb_backup_in, (cl(c0, 0, S, opts=_syn_opts(t, 0)),)),
            ("primary", p._cb_primary_out, (sv(p0, c1, S | A, opts=_syn_opts(t + 1, t)),)),
            ("backup", b._on_sync_readable, ()),
            ("backup", b._cb_backup_out, (sv(b0, c1, S | A, opts=_syn_opts(t + 2, t)),)),
            ("backup", b._batch_end, ()),
            ("primary", p._on_sync_readable, ()),
            ("backup", b._cb_backup_in, (cl(c1, seq_add(p0, 1), tsval=t + 3, tsecr=t + 1),)),
            ("backup", b._cb_backup_in, (cl(c1, seq_add(p0, 1), AP, b"x", tsval=t + 3, tsecr=t + 1),)),
            ("primary", p._cb_primary_out, (sv(seq_add(p0, 1), c2, AP, b"x", tsval=t + 4),)),
            ("backup", b._cb_backup_out, (sv(seq_add(b0, 1), c2, AP, b"x", tsval=t + 5),)),
            ("backup", b._batch_end, ()),
            ("primary", p._on_sync_readable, ()),
            ("backup", b._cb_backup_in, (cl(c2, seq_add(p0, 2), F, tsval=t + 6, tsecr=t + 4),)),
            ("primary", p._cb_primary_out, (sv(seq_add(p0, 2), c3, F, tsval=t + 7),)),
            ("backup", b._cb_backup_out, (sv(seq_add(b0, 2), c3, F, tsval=t + 8),)),
            ("backup", b._cb_backup_in, (cl(c3, seq_add(p0, 3), tsval=t + 9, tsecr=t + 7),)),
            ("backup", b._batch_end, ()),
            ("primary", p._on_sync_readable, ()),
            ("primary", p._batch_end, ()),
            ("backup", b._on_sync_readable, ()),
        ]
        for host, call, args in steps:
            clock.on(host, call, *args)
            if args:
                packets[host] += 1
    _settle(p, b)
    mapped = sum(1 for conn in b.backup.conns.values() if conn.delta_seq is not None)
    return {
        "us_per_connection": {h: round(clock.s[h] / n * 1e6, 1) for h in clock.s},
        "packets": packets,
        "counters": {"primary": dict(p.counters), "backup": dict(b.counters)},
        "sync_messages": {"primary": p.sync.sent, "backup": b.sync.sent},
        # What the connections went through: the path the figure stands for.
        "connection": {"protected_by_primary": sum(c.protected for c in p.primary.conns.values()),
                       "held_by_primary": sum(c.held_synack is not None or len(c.deferred) > 0
                                              for c in p.primary.conns.values()),
                       "mapped_by_backup": mapped,
                       "closed_by_backup": sum(c.fully_closed() for c in b.backup.conns.values()),
                       "held_by_backup": sum(len(c.held) for c in b.backup.conns.values())},
    }


def _result(clock: _Clock, packets: dict[str, int], p: Any, b: Any) -> dict[str, Any]:
    key = (CLIENT, CPORT, VIP, SPORT)
    pc, bc = p.primary.conns[key], b.backup.conns[key]
    return {
        "us_per_packet": {h: round(clock.s[h] / packets[h] * 1e6, 2) for h in packets},
        "packets": packets,
        "counters": {"primary": dict(p.counters), "backup": dict(b.counters)},
        "sync_messages": {"primary": p.sync.sent, "backup": b.sync.sent},
        # What the connection went through: the path the figures stand for.
        "connection": {"protected": pc.protected and bc.protected, "acks_clamped": pc.clamped,
                       "held_by_backup": len(bc.held),
                       "checked_by_backup": None if bc.checker is None else seq_sub(bc.checker.base, ISN_B + 1),
                       "ranges_unchecked": None if bc.checker is None else bc.checker.skipped},
    }


# What each workload's figure is per.
_UNIT = {"download": "us_per_packet", "request_response": "us_per_packet", "connections": "us_per_connection"}


def measure(n: int = 3000, rounds: int = 3) -> dict[str, Any]:
    """Each workload ``rounds`` times, alternating; the median round's
    figures per host, and every round's."""
    out: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {"download": [], "request_response": [], "connections": []}
    for _ in range(rounds):
        runs["download"].append(download(n))
        runs["request_response"].append(request_response(n))
        runs["connections"].append(connections(n))
    for name, rs in runs.items():
        unit = _UNIT[name]
        per = {h: [r[unit][h] for r in rs] for h in ("primary", "backup")}  # (in the order run)
        out[name] = {unit: {h: sorted(v)[len(v) // 2] for h, v in per.items()}, "rounds": per,
                     "counters": rs[-1]["counters"], "packets": rs[-1]["packets"],
                     "connection": rs[-1]["connection"]}
    out["python"] = "%d.%d" % sys.version_info[:2]
    return out


def rounds_lines(res: dict[str, Any]) -> list[str]:
    """Every round's figures, in the order they ran."""
    return ["  %s, every round: %s" % (name.replace("_", "-"), "; ".join(
        "%s %s" % (h, " ".join("%.1f" % v for v in vals)) for h, vals in res[name]["rounds"].items()))
        for name in _UNIT if name in res]


def line(res: dict[str, Any]) -> str:
    d, r = res["download"]["us_per_packet"], res["request_response"]["us_per_packet"]
    text = ("the daemons' own code per packet, without the kernel (us, median of %d rounds): download primary "
            "%.1f, backup %.1f; request-response primary %.1f, backup %.1f" % (
                len(res["download"]["rounds"]["primary"]), d["primary"], d["backup"], r["primary"], r["backup"]))
    if "connections" in res:  # (a bench.json from before has none)
        c = res["connections"]["us_per_connection"]
        text += "; per short connection (SYN to FIN, one echo byte) primary %.1f, backup %.1f" % (
            c["primary"], c["backup"])
    return text
