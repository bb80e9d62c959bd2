"""Divergence detection: do both copies of the application write the same
bytes? (pure)

The primary hashes its output stream per connection in consecutive ranges
(``OutputHasher``) and sends each range's digest over the sync link. The
backup keeps its own output since the last verified byte (``OutputChecker``)
and hashes the same ranges. A mismatch means the application is not
deterministic: that connection cannot be migrated without handing the
client bytes the primary never sent, so it is marked unprotected, and reset
at a failover.

Ranges follow the primary's output, so segmentation never matters, and a
digest lost on the sync link only leaves a range unverified. The limit: a
byte is verified once both copies produced it and the primary's digest has
arrived (one sync round trip); bytes the primary wrote in the last instant
before a crash are not.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from .seqmath import seq_gt, seq_lt, seq_sub
from .tcpseg import native

# CRC-32C: the copies are trusted, so a digest needs only to notice bytes that
# differ, and any difference in up to 32 consecutive bits always changes it
# (other differences: all but 1 in 2**32). Per 64 KB of output, on this VM:
# SHA-256 87 us, zlib's CRC-32 18-27 us, CRC-32C with the SSE4.2 instruction
# (_csum.c) 8.5 us in one stream, 4 us in three. Both daemons pay it for
# every byte the service writes.
DIGEST_LEN = 4
MAX_AHEAD = 16 << 20  # output the backup buffers ahead of the primary's digests
MAX_PENDING = 4096


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_TABLE = _crc32c_table()


def _crc32c_py(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``value`` (the convention of
    zlib.crc32). The same answers as the C version, hundreds of times slower:
    without the extension a bulk transfer is bound by this loop."""
    c = value ^ 0xFFFFFFFF
    table = _TABLE
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


crc32c = native.crc32c if native is not None else _crc32c_py


def digest_bytes(crc: int) -> bytes:
    """A CRC-32C as the digest the sync link carries."""
    return crc.to_bytes(DIGEST_LEN, "big")


class OutputHasher:
    """The primary's side: new output bytes accumulate into the current range."""

    __slots__ = ("start", "next", "h", "n")

    def __init__(self, start: int) -> None:
        self.start = self.next = start  # sequence numbers (our space)
        self.h = 0  # CRC-32C so far
        self.n = 0

    def feed(self, seq: int, payload: bytes | memoryview) -> None:
        """A data segment we sent; retransmitted bytes are not new."""
        end = (seq + len(payload)) & 0xFFFFFFFF
        if not seq_gt(end, self.next):
            return
        if seq_gt(seq, self.next):  # a hole (we missed a segment): start a range after it
            self.start = self.next = seq
            self.h, self.n = 0, 0
        skip = seq_sub(self.next, seq)
        self.h = crc32c(payload[skip:], self.h)
        self.n += len(payload) - skip
        self.next = end

    def take(self) -> Optional[tuple[int, int, bytes]]:
        """(start, length, digest) of the range so far, and start the next one."""
        if not self.n:
            return None
        out = (self.start, self.n, digest_bytes(self.h))
        self.start, self.h, self.n = self.next, 0, 0
        return out


class OutputChecker:
    """The backup's side: its own output, kept until the primary's digests
    cover it. Sequence numbers here are the backup's own.

    The output is kept as views of the packets the driver read, not copied
    into one buffer: the backup's daemon paces the whole protected transfer,
    and copying each 64 KB packet in and shifting it out cost it some 28 us.
    CRC-32C runs over the views in order, so a range may span any number of
    them."""

    __slots__ = ("base", "chunks", "size", "pending", "skipped")

    def __init__(self, start: int) -> None:
        self.base = start  # sequence number of the first byte kept
        # Both made when first needed and dropped again when empty: an empty
        # deque takes some 600 bytes, and an idle connection needs neither
        # (10,000 idle connections cost the backup 5073 B each with both made
        # up front, 3346 B so).
        self.chunks: deque[memoryview] | tuple = ()  # consecutive, from base on
        self.size = 0
        self.pending: deque[tuple[int, int, bytes]] | tuple = ()
        self.skipped = 0  # ranges left unverified (a digest lost, or overlapping)

    @property
    def end(self) -> int:
        return (self.base + self.size) & 0xFFFFFFFF

    def feed(self, seq: int, payload: bytes | memoryview) -> None:
        end = (seq + len(payload)) & 0xFFFFFFFF
        if not seq_gt(end, self.end):
            return
        if seq_gt(seq, self.end):  # a hole in our own output: nothing before it can be checked
            self._restart(seq)
        view = memoryview(payload)
        if not isinstance(view.obj, bytes):
            view = memoryview(bytes(view))  # only immutable bytes may be kept by reference
        view = view[seq_sub(self.end, seq):]
        if not self.chunks:
            self.chunks = deque()
        self.chunks.append(view)  # type: ignore[union-attr]
        self.size += len(view)

    def expect(self, start: int, length: int, dig: bytes) -> None:
        """The primary's digest of [start, start+length) (mapped into our space)."""
        if not self.pending:
            self.pending = deque()
        elif len(self.pending) >= MAX_PENDING:
            self.pending.popleft()  # type: ignore[union-attr]
            self.skipped += 1
        self.pending.append((start, length, dig))  # type: ignore[union-attr]

    def too_far_ahead(self) -> bool:
        return self.size > MAX_AHEAD

    def check(self) -> Optional[int]:
        """Verify every range we have the bytes for; the sequence number where
        a mismatching range starts, or None."""
        while self.pending:
            start, length, dig = self.pending[0]
            end = (start + length) & 0xFFFFFFFF
            if seq_lt(start, self.base):
                # Behind what we verified (an overlap after a skip): unverifiable.
                self.pending.popleft()
                self.skipped += 1
                if seq_gt(end, self.base):
                    self._drop_to(end)
                continue
            if seq_gt(start, self.base):
                self.skipped += 1  # the digest of [base, start) was lost
                if seq_gt(start, self.end):
                    self._restart(start)
                else:
                    self._drop_to(start)
            if seq_lt(self.end, end):
                return None  # we have not written these bytes yet
            self.pending.popleft()
            if digest_bytes(self._crc(length)) != dig:
                return start
            self._drop_to(end)
        self.pending = ()
        return None

    def _crc(self, length: int) -> int:
        """CRC-32C of the first ``length`` bytes kept (length <= size)."""
        h = 0
        for view in self.chunks:
            if length <= 0:
                break
            h = crc32c(view[:length], h)
            length -= len(view)
        return h

    def _restart(self, seq: int) -> None:
        self.base, self.size = seq, 0
        self.chunks = ()

    def _drop_to(self, seq: int) -> None:
        n = seq_sub(seq, self.base)
        if n >= self.size:
            self._restart(seq)
            return
        self.base, self.size = seq, self.size - n
        while n:
            first = self.chunks[0]
            if len(first) <= n:
                self.chunks.popleft()
                n -= len(first)
            else:
                self.chunks[0] = first[n:]
                n = 0
