"""The built-in deterministic test server the lab runs on both servers.

* 7000 echo: every byte comes back.
* 7001 bulk source: the client sends ``LENGTH [SEED]\\n``; the server sends
  ``stream_bytes(SEED, 0, LENGTH)`` and closes. ``LENGTH SEED raw\\n`` sends
  one fixed 64 KiB block over and over instead (throughput benchmarks).
  ``LENGTH SEED pace=KBPS\\n`` sends at that rate, a write every 2 ms.
  ``LENGTH SEED discard\\n`` turns it around: the server reads LENGTH bytes
  (fewer if the client's FIN comes first), keeps none, and answers their
  count and a newline (throughput benchmarks). Any other third word closes
  the connection.
* 7002 sink: the server reads until the client's FIN, then answers with the
  sha256 hex digest of everything it read and a newline, and closes.
* 7003 banner (server speaks first): ``220 nfq-sttcp banner ready\\r\\n``,
  then ``250 N <line>\\r\\n`` for the N-th line received; ``QUIT`` closes.
* 7004 request-response: for each request line ``SIZE SEED\\n`` the server
  answers ``stream_bytes(SEED, 0, SIZE)``; it closes after the client's FIN.

Both copies must write identical bytes (ST-TCP's determinism requirement).
``--backup-delay-ms`` makes the copy started with STTCP_ROLE=backup slower
(DESIGN.md trap 9) without changing the command line.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import socket
import sys
import threading
import time
from array import array

ECHO, BULK, SINK, BANNER, RR = 7000, 7001, 7002, 7003, 7004
MAX_RR_RESPONSE = 1 << 24
BANNER_LINE = b"220 nfq-sttcp banner ready\r\n"
_WORDS_PER_BLOCK = 8192  # 64 KiB


# Word i of a block is base + i. Read as one integer in the machine's byte
# order, a block is then _INDICES + base * _ONES: no word carries into the next, as
# base + i < 2**64. Two big-integer operations build it ~5 times faster than
# an array of the range: the old way capped the bulk source at ~0.8 Gbit/s,
# which the benchmark then took for plain TCP's speed.
_INDICES = int.from_bytes(array("Q", range(_WORDS_PER_BLOCK)).tobytes(), sys.byteorder)
_ONES = int.from_bytes(array("Q", [1] * _WORDS_PER_BLOCK).tobytes(), sys.byteorder)
# A fixed block for ``LENGTH SEED raw`` (benchmarks: no generation at all).
_RAW_BLOCK = bytes(range(256)) * (8 * _WORDS_PER_BLOCK // 256)


# Cached: a request-response answer is the stream's first bytes every time.
# Built anew for each answer, the block cost the server 80 us of CPU for a
# 1-byte answer, more than plain TCP's whole round trip in the lab; and the
# backup's copy of the application paid it again on the same two CPUs, so the
# benchmark charged ST-TCP for the test server's own waste.
@functools.lru_cache(maxsize=4)
def stream_block(seed: int, block: int) -> bytes:
    """64 KiB block ``block`` of the deterministic stream: each 8-byte word
    (native byte order) holds its own index, so a lost, repeated or shifted
    byte never matches."""
    base = ((seed & 0xFFFF) << 48) | (block * _WORDS_PER_BLOCK)
    return (_INDICES + base * _ONES).to_bytes(8 * _WORDS_PER_BLOCK, sys.byteorder)


def stream_bytes(seed: int, offset: int, length: int) -> bytes:
    out = bytearray()
    end = offset + length
    blk = offset // (8 * _WORDS_PER_BLOCK)
    pos = blk * 8 * _WORDS_PER_BLOCK
    while pos < end:
        b = stream_block(seed, blk)
        lo, hi = max(offset - pos, 0), min(end - pos, len(b))
        out += b[lo:hi]
        pos += len(b)
        blk += 1
    return bytes(out)


def write_size(rate: float, every_s: float) -> int:
    """Bytes per write that send ``rate`` bytes a second in writes
    ``every_s`` apart (1 KB to 64 KB)."""
    return int(min(65536, max(1024, rate * every_s)))


def pace(done: int, rate: float, start: float) -> None:
    """Sleep until ``done`` bytes are due at ``rate`` bytes a second since ``start`` (monotonic)."""
    ahead = done / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)


def _close_after_client(c: socket.socket) -> None:
    """Our side is done: say so (FIN), and let the client close first."""
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass


class Server:
    def __init__(self, host: str, delay_s: float) -> None:
        self.host = host
        self.delay = delay_s

    def _slow(self) -> None:
        if self.delay:
            time.sleep(self.delay)

    def serve_echo(self, c: socket.socket) -> None:
        while True:
            d = c.recv(65536)
            if not d:
                return
            self._slow()
            c.sendall(d)

    def serve_bulk(self, c: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            d = c.recv(1)
            if not d:
                return
            line += d
            if len(line) > 64:
                return
        parts = line.split()
        length = int(parts[0])
        seed = int(parts[1]) if len(parts) > 1 else 0
        mode = parts[2] if len(parts) > 2 else b""
        if mode == b"discard":
            self._discard(c, length)
            return
        if mode not in (b"", b"raw") and not mode.startswith(b"pace="):
            return  # (closed at once: a client that meant to send finds out now, not at its timeout)
        raw = mode == b"raw"
        rate = int(mode[5:]) * 1000 / 8 if mode.startswith(b"pace=") else 0
        step = write_size(rate, 0.002) if rate else 1 << 30
        start = time.monotonic()
        sent = 0
        blk = 0
        while sent < length:
            b = (_RAW_BLOCK if raw else stream_block(seed, blk))[: length - sent]
            for i in range(0, len(b), step):
                c.sendall(b[i:i + step])
                if rate:
                    pace(sent + i + step, rate, start)
            sent += len(b)
            blk += 1
            if blk % 16 == 0:
                self._slow()
        _close_after_client(c)

    def _discard(self, c: socket.socket, length: int) -> None:
        """Read ``length`` bytes, keep none, answer how many came (fewer if
        the client's FIN came first), then close after the client does. The
        benchmark's upload: the sink on 7002 hashes every byte (SHA-256, some
        1.8 GB/s here), and the backup's copy of the application hashed
        them again on the same CPUs, which plain TCP never pays."""
        buf = bytearray(1 << 18)
        got = 0
        while got < length:
            n = c.recv_into(buf, min(len(buf), length - got))
            if not n:
                break
            got += n
        self._slow()
        c.sendall(b"%d\n" % got)
        _close_after_client(c)

    def serve_sink(self, c: socket.socket) -> None:
        h = hashlib.sha256()
        while True:
            d = c.recv(262144)
            if not d:
                break
            h.update(d)
        self._slow()
        c.sendall(h.hexdigest().encode() + b"\n")

    def serve_banner(self, c: socket.socket) -> None:
        c.sendall(BANNER_LINE)
        f = c.makefile("rb")
        n = 0
        for line in f:
            n += 1
            text = line.rstrip(b"\r\n")
            self._slow()
            if text.upper() == b"QUIT":
                c.sendall(b"221 bye\r\n")
                return
            c.sendall(b"250 %d %s\r\n" % (n, text))

    def serve_rr(self, c: socket.socket) -> None:
        for line in c.makefile("rb"):
            parts = line.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) > MAX_RR_RESPONSE:
                return
            self._slow()
            c.sendall(stream_bytes(int(parts[1]), 0, int(parts[0])))

    def listen(self, port: int, handler) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(512)

        def accept_loop() -> None:
            while True:
                c, _ = s.accept()
                threading.Thread(target=self._run, args=(handler, c), daemon=True).start()

        threading.Thread(target=accept_loop, daemon=True).start()

    @staticmethod
    def _run(handler, c: socket.socket) -> None:
        try:
            with c:
                handler(c)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nfq-sttcp testapp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--base-port", type=int, default=ECHO,
                    help="echo on BASE, bulk on BASE+1, sink on BASE+2, banner on BASE+3, request-response on BASE+4")
    ap.add_argument("--backup-delay-ms", type=float, default=0.0,
                    help="delay each response by this much when STTCP_ROLE=backup")
    args = ap.parse_args(argv)
    delay = args.backup_delay_ms / 1000.0 if os.environ.get("STTCP_ROLE") == "backup" else 0.0
    srv = Server(args.host, delay)
    b = args.base_port
    for off, h in enumerate((srv.serve_echo, srv.serve_bulk, srv.serve_sink, srv.serve_banner, srv.serve_rr)):
        srv.listen(b + off, h)
    print("testapp listening on %s:%d-%d (delay %.0f ms)" % (args.host, b, b + 4, delay * 1000), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
