"""Test clients for the built-in test server, run in the client's namespace.

Each ``--conn KIND[:key=value,...]`` opens one connection and checks every
byte it gets back. When every connection has reached its crash point it
prints ``CRASHPOINT`` on stdout; whoever runs it crashes the primary and
writes ``CRASH <time.monotonic()>`` to its stdin (the namespaces share one
monotonic clock). At the end it prints one JSON object: per connection,
bytes sent, received and verified, the first mismatching offset, the error
if any, and the failover gap — the longest time the client waited for data
it was owed, across the crash.

Kinds (defaults in brackets):
  echo:count=[40],size=[2000],pause_ms=[20],crash_msg=[count/2],inside=[0],after=[5]
  download:bytes=[50MB],seed=[1],rate_kbps=[0 = unlimited],server_pace=[0],crash_at=[bytes/3]
  upload:bytes=[50MB],seed=[2],rate_kbps=[0],write_ms=[0 = 64 KB writes],crash_at=[bytes/3]
  banner:lines=[30],pause_ms=[20],crash_line=[lines/2],after=[5]
  rr:count=[40],size=[20000],pause_ms=[20],crash_msg=[count/2],after=[5]

With ``pipelined=1`` a connection sends its whole request stream at once
(a sender thread), shuts down writing, and reads the whole answer (at
``rate_kbps`` if given); it is ready for the crash once its FIN is sent
(``ready=0``), or (``ready=1``) once its FIN is sent and nothing has arrived
for 200 ms: the end of the answer and the server's FIN are held up (the
matrix drops the FINs the client receives until the crash). ``--crash-after-ms`` prints
CRASHPOINT after that long whatever the connections' state (for crashes in
the handshake). With ``--start-together`` every connection waits, once it is
open, until all of them are open before it starts its work, so that many
connections are all mid-stream at one moment.

A download's ``rate_kbps`` is the client's reading pace by default: its
window shuts and opens every few tens of milliseconds, and the server's
data comes in bursts. With ``server_pace=1`` the server writes at that rate
and the client reads at once, so the window stays open and the gap on the
wire is the failover's own.

Interactive kinds keep going past their count until ``after`` more
exchanges followed the crash, so they are mid-stream when it happens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .testapp import BANNER_LINE, RR, pace, stream_bytes, write_size

TCP_INFO = 11
CRASHED = threading.Event()  # set once the crash happened (or will not happen)
_BYTES_ACKED_OFFSET = 120  # struct tcp_info: tcpi_bytes_acked (u64)


def recv_line(s: socket.socket, bufsize: int) -> bytes:
    """Read up to a newline, or to the peer's FIN (then the line may be short)."""
    line = b""
    while not line.endswith(b"\n"):
        d = s.recv(bufsize)
        if not d:
            break
        line += d
    return line


@dataclass
class Result:
    kind: str
    port: int
    ok: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    verified: int = 0
    first_mismatch: Optional[int] = None
    error: Optional[str] = None
    events: list[tuple[float, str]] = field(default_factory=list)  # (t, "progress"|"request")
    local_port: int = 0
    gap_ms: Optional[float] = None
    ended: float = 0.0  # time.monotonic() when the connection was done with, well or not
    open_at_crash: Optional[bool] = None  # still owed something when the crash came

    def progress(self) -> None:
        self.events.append((time.monotonic(), "p"))

    def request(self) -> None:
        self.events.append((time.monotonic(), "r"))

    def compute_gap(self, crash_t: Optional[float]) -> None:
        """Longest wait for owed data that ends after the crash: from the last
        byte (or request) before it to the first byte after it."""
        if crash_t is None:
            return
        self.open_at_crash = self.ended > crash_t
        last = None
        worst = 0.0
        for t, kind in self.events:
            if kind == "p" and last is not None and t > crash_t:
                worst = max(worst, t - last)
            last = t
        self.gap_ms = round(worst * 1000, 1)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("events", "ended")}


class Worker(threading.Thread):
    def __init__(self, target: str, kind: str, params: dict[str, int], ready: threading.Event, timeout: float,
                 start: Optional[threading.Barrier] = None) -> None:
        super().__init__(daemon=True)
        self.start_barrier = start
        self.target, self.kind, self.p = target, kind, params
        self.ready = ready
        self.timeout = timeout
        port = {"echo": 7000, "download": 7001, "upload": 7002, "banner": 7003, "rr": RR}[kind]
        self.port = params.get("port", port)
        self.result = Result(kind, self.port)
        self.after_crash_start: Optional[int] = None
        # Built before any thread starts: making 100 answers of 400 KB each
        # takes seconds of one GIL, and made by the threads it would spread
        # the connections' starts over those seconds.
        self.planned = self.pipeline() if params.get("pipelined") else None

    def run(self) -> None:
        r = self.result
        try:
            s = socket.create_connection((self.target, self.port), timeout=self.timeout)
            r.local_port = s.getsockname()[1]
            with s:
                if self.start_barrier is not None:
                    try:
                        self.start_barrier.wait(self.timeout)
                    except threading.BrokenBarrierError:
                        pass  # a connection failed to open: it reports that; the rest go on
                if self.planned is not None:
                    self.run_pipelined(s, *self.planned)
                else:
                    getattr(self, "run_" + self.kind)(s)
        except Exception as e:  # reported, never raised
            r.error = "%s: %s" % (type(e).__name__, e)
            r.ok = False
            if self.start_barrier is not None:
                self.start_barrier.abort()  # nobody waits for a connection that will not open
        finally:
            r.ended = time.monotonic()
            self.ready.set()

    def _more(self, done: int, count: int) -> bool:
        """Another exchange? At least ``count``, and ``after`` more once crashed."""
        if done < count:
            return True
        if not CRASHED.is_set():
            return True
        if self.after_crash_start is None:
            self.after_crash_start = done
        return done - self.after_crash_start < self.p.get("after", 5)

    def _recv_exact(self, s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            d = s.recv(min(65536, n - len(buf)))
            if not d:
                raise ConnectionError("EOF after %d of %d bytes" % (len(buf), n))
            buf += d
            self.result.bytes_received += len(d)
            self.result.progress()
        return bytes(buf)

    def _verify(self, got: bytes, want: bytes, what: str) -> None:
        """One exchange's answer, byte for byte; counts it as verified."""
        r = self.result
        if got != want:
            r.first_mismatch = r.verified + next(j for j in range(len(want)) if got[j] != want[j])
            raise ValueError(what)
        r.verified += len(want)

    def _close_quietly(self, s: socket.socket, after: str) -> None:
        """Our FIN, then the server's, with nothing in between."""
        s.shutdown(socket.SHUT_WR)
        if s.recv(1):
            raise ValueError("unexpected bytes after %s" % after)
        self.result.ok = True

    def run_echo(self, s: socket.socket) -> None:
        p, r = self.p, self.result
        count, size = p.get("count", 40), p.get("size", 2000)
        pause = p.get("pause_ms", 20) / 1000
        crash_msg = p.get("crash_msg", count // 2)
        inside = p.get("inside", 0)
        rng = random.Random(p.get("seed", 7))
        i = 0
        while self._more(i, count):
            msg = rng.randbytes(size)
            r.request()
            if inside and i == crash_msg:
                # Crash inside a message: half of it sent and echoed, the rest after.
                half = size // 2
                s.sendall(msg[:half])
                r.bytes_sent += half
                got = self._recv_exact(s, half)
                self.ready.set()
                s.sendall(msg[half:])
                r.bytes_sent += size - half
                got += self._recv_exact(s, size - half)
            else:
                s.sendall(msg)
                r.bytes_sent += size
                got = self._recv_exact(s, size)
            self._verify(got, msg, "echo mismatch in message %d" % i)
            if not inside and i == crash_msg:
                self.ready.set()
            time.sleep(pause)
            i += 1
        self._close_quietly(s, "the echo session")

    def run_download(self, s: socket.socket) -> None:
        p, r = self.p, self.result
        total, seed = p.get("bytes", 50 << 20), p.get("seed", 1)
        crash_at = p.get("crash_at", total // 3)
        rate = p.get("rate_kbps", 0) * 1000 / 8
        if rate and p.get("server_pace"):
            s.sendall(b"%d %d pace=%d\n" % (total, seed, p["rate_kbps"]))
            rate = 0
        else:
            s.sendall(b"%d %d\n" % (total, seed))
        r.request()
        start = time.monotonic()
        while True:
            d = s.recv(65536 if not rate else 16384)
            if not d:
                break
            off = r.bytes_received
            r.bytes_received += len(d)
            r.progress()
            exp = stream_bytes(seed, off, len(d))
            if d != exp:
                r.first_mismatch = off + next(j for j in range(min(len(d), len(exp))) if d[j] != exp[j]) \
                    if any(d[j] != exp[j] for j in range(min(len(d), len(exp)))) else off + min(len(d), len(exp))
                raise ValueError("download mismatch at offset %d" % r.first_mismatch)
            r.verified = r.bytes_received
            if r.bytes_received >= crash_at:
                self.ready.set()
            if rate:
                pace(r.bytes_received, rate, start)
        if r.bytes_received != total:
            raise ValueError("download ended after %d of %d bytes" % (r.bytes_received, total))
        r.ok = True

    def run_upload(self, s: socket.socket) -> None:
        p, r = self.p, self.result
        total, seed = p.get("bytes", 50 << 20), p.get("seed", 2)
        crash_at = p.get("crash_at", total // 3)
        rate = p.get("rate_kbps", 0) * 1000 / 8
        h = hashlib.sha256()
        stop = threading.Event()
        poller = threading.Thread(target=self._poll_acked, args=(s, stop), daemon=True)
        poller.start()
        # 64 KB writes at 16 Mbit/s go out in one burst every 32 ms, and a
        # failover's figures (the client's gap, the backup's "first client
        # segment") then measure that cadence: write_ms=2 writes every 2 ms.
        write_s = p.get("write_ms", 0) / 1000
        step = write_size(rate, write_s) if rate and write_s else 65536
        start = time.monotonic()
        try:
            off = 0
            while off < total:
                chunk = stream_bytes(seed, off, min(step, total - off))
                s.sendall(chunk)
                h.update(chunk)
                off += len(chunk)
                r.bytes_sent = off
                if off >= crash_at:
                    self.ready.set()
                if rate:
                    pace(off, rate, start)
            s.shutdown(socket.SHUT_WR)
            reply = recv_line(s, 100)
        finally:
            stop.set()
            poller.join()
        r.bytes_received = len(reply)
        r.progress()
        if reply.strip().decode(errors="replace") != h.hexdigest():
            r.first_mismatch = 0
            raise ValueError("sink hash %r differs from the sent data's %s" % (reply.strip()[:64], h.hexdigest()))
        r.verified = total
        r.ok = True

    def _poll_acked(self, s: socket.socket, stop: threading.Event) -> None:
        last = 0
        while not stop.is_set():
            try:
                info = s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 256)
            except OSError:
                return
            acked = struct.unpack_from("Q", info, _BYTES_ACKED_OFFSET)[0]
            if acked != last:
                last = acked
                self.result.progress()
            time.sleep(0.001)

    def run_banner(self, s: socket.socket) -> None:
        p, r = self.p, self.result
        lines, pause = p.get("lines", 30), p.get("pause_ms", 20) / 1000
        crash_line = p.get("crash_line", lines // 2)
        f = s.makefile("rb")
        r.request()
        first = f.readline()
        r.bytes_received += len(first)
        r.progress()
        if first != BANNER_LINE:
            r.first_mismatch = 0
            raise ValueError("banner %r" % first)
        r.verified += len(first)
        i = 0
        while self._more(i, lines):
            i += 1
            text = b"line %d %s" % (i, b"x" * (i % 50))
            r.request()
            s.sendall(text + b"\r\n")
            r.bytes_sent += len(text) + 2
            got = f.readline()
            r.bytes_received += len(got)
            r.progress()
            want = b"250 %d %s\r\n" % (i, text)
            if got != want:
                r.first_mismatch = r.verified
                raise ValueError("banner reply %r, wanted %r" % (got, want))
            r.verified += len(got)
            if i == crash_line:
                self.ready.set()
            time.sleep(pause)
        s.sendall(b"QUIT\r\n")
        if f.readline() != b"221 bye\r\n":
            raise ValueError("no goodbye")
        r.ok = True


    def run_rr(self, s: socket.socket) -> None:
        p, r = self.p, self.result
        count, size = p.get("count", 40), p.get("size", 20000)
        pause = p.get("pause_ms", 20) / 1000
        crash_msg = p.get("crash_msg", count // 2)
        i = 0
        while self._more(i, count):
            seed = (p.get("seed", 3) * 1000 + i) & 0xFFFF
            r.request()
            req = b"%d %d\n" % (size, seed)
            s.sendall(req)
            r.bytes_sent += len(req)
            got = self._recv_exact(s, size)
            self._verify(got, stream_bytes(seed, 0, size), "response %d differs" % i)
            if i == crash_msg:
                self.ready.set()
            time.sleep(pause)
            i += 1
        self._close_quietly(s, "the last response")

    def pipeline(self) -> tuple[bytes, bytes]:
        """The whole request stream of this connection and the answer it must get."""
        p, k = self.p, self.kind
        if k == "echo":
            data = random.Random(p.get("seed", 7)).randbytes(p.get("count", 40) * p.get("size", 2000))
            return data, data
        if k == "download":
            total, seed = p.get("bytes", 2 << 20), p.get("seed", 1)
            return b"%d %d\n" % (total, seed), stream_bytes(seed, 0, total)
        if k == "upload":
            data = stream_bytes(p.get("seed", 2), 0, p.get("bytes", 2 << 20))
            return data, hashlib.sha256(data).hexdigest().encode() + b"\n"
        if k == "banner":
            lines = [b"line %d %s" % (i, b"x" * (i % 50)) for i in range(1, p.get("lines", 30) + 1)]
            req = b"".join(t + b"\r\n" for t in lines) + b"QUIT\r\n"
            return req, BANNER_LINE + b"".join(b"250 %d %s\r\n" % (i, t) for i, t in enumerate(lines, 1)) + \
                b"221 bye\r\n"
        seeds = [(p.get("seed", 3) * 1000 + i) & 0xFFFF for i in range(p.get("count", 40))]
        size = p.get("size", 20000)
        return b"".join(b"%d %d\n" % (size, sd) for sd in seeds), b"".join(stream_bytes(sd, 0, size) for sd in seeds)

    def run_pipelined(self, s: socket.socket, req: bytes, want: bytes) -> None:
        p, r = self.p, self.result
        at_end = bool(p.get("ready", 0))
        rate = p.get("rate_kbps", 0) * 1000 / 8
        sent = threading.Event()

        def send() -> None:
            try:
                for off in range(0, len(req), 65536):
                    s.sendall(req[off:off + 65536])
                    r.bytes_sent += len(req[off:off + 65536])
                s.shutdown(socket.SHUT_WR)
            except OSError as e:
                r.error = r.error or "send: %s" % e
            sent.set()
            if not at_end:
                self.ready.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        r.request()
        got = bytearray()
        start = time.monotonic()
        last = time.monotonic()
        while True:
            if at_end and not select.select([s], [], [], 0.2)[0]:
                if sent.is_set():
                    self.ready.set()
                if time.monotonic() - last > self.timeout:
                    raise TimeoutError("no answer for %.0f s" % self.timeout)
                continue
            d = s.recv(16384 if rate else 65536)
            last = time.monotonic()
            if not d:
                break
            base = len(got)
            got += d
            r.bytes_received = len(got)
            r.progress()
            exp = want[base:base + len(d)]
            if d != exp:
                n = min(len(d), len(exp))
                r.first_mismatch = base + next((j for j in range(n) if d[j] != exp[j]), n)
                raise ValueError("answer differs at offset %d" % r.first_mismatch)
            r.verified = len(got)
            if rate:
                pace(len(got), rate, start)
        sender.join()
        if r.error:
            raise ValueError(r.error)
        if len(got) != len(want):
            raise ValueError("answer ended after %d of %d bytes" % (len(got), len(want)))
        r.ok = True


def parse_conn(spec: str) -> tuple[str, dict[str, int]]:
    kind, _, rest = spec.partition(":")
    if kind not in ("echo", "download", "upload", "banner", "rr"):
        raise ValueError("unknown connection kind %r" % kind)
    params: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        params[k] = int(float(v))
    return kind, params


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nfq-sttcp traffic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="10.77.0.100")
    ap.add_argument("--conn", action="append", required=True, help="KIND[:key=value,...] (repeatable)")
    ap.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    ap.add_argument("--wait-crash", action="store_true",
                    help="after CRASHPOINT, read 'CRASH <monotonic>' from stdin to measure the gap")
    ap.add_argument("--crash-after-ms", type=float, help="CRASHPOINT after this long, ready or not")
    ap.add_argument("--start-together", action="store_true",
                    help="every connection starts its work once all of them are open")
    args = ap.parse_args(argv)
    together = threading.Barrier(len(args.conn)) if args.start_together else None
    workers = []
    for spec in args.conn:
        kind, params = parse_conn(spec)
        workers.append(Worker(args.target, kind, params, threading.Event(), args.timeout, together))
    for w in workers:
        w.start()
    if args.crash_after_ms is not None:
        time.sleep(args.crash_after_ms / 1000)
    else:
        for w in workers:
            w.ready.wait()
    print("CRASHPOINT", flush=True)
    crash_t: Optional[float] = None
    if args.wait_crash:
        rl, _, _ = select.select([sys.stdin], [], [], args.timeout)
        if rl:
            line = sys.stdin.readline().split()
            if len(line) == 2 and line[0] == "CRASH":
                crash_t = float(line[1])
    CRASHED.set()
    for w in workers:
        w.join()
    results = []
    for w in workers:
        w.result.compute_gap(crash_t)
        results.append(w.result.summary())
    print(json.dumps({"ok": all(r["ok"] for r in results), "crash_t": crash_t, "connections": results}), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
