"""The primary's kernel fast path: an eBPF program, run by the ``bpf``
iptables match in front of the primary's queue, that lets a client-bound
data segment go straight out when the daemon would only have accepted it
unchanged (pure: the program's instructions and the maps' byte layouts;
bpf.py loads them, the driver keeps the maps current).

A segment takes the fast path only if all of these hold, else it is queued
as before:

* IPv4 without options, not a fragment, TCP with exactly the timestamp
  option (NOP NOP TS) or with no option at all (a connection without
  timestamps), flags ACK or ACK|PSH, and a payload;
* its connection has an entry in both maps (the daemon adds one only while
  the connection is protected, its handshake done, nothing deferred, and
  the backup's position and ack known: PrimaryCore.fast_limits);
* it is next in order: its sequence number is where the later of two ended,
  the last fast segment and the last segment the daemon accepted (the fast
  one counts only up to 1 GB ahead: further, it is an old one wrapped
  round). A segment queued for any reason makes every later one miss, so
  nothing ever overtakes a queued segment, and a resend is never next;
* it ends within the lag bound (the backup's output position plus
  max_backup_lag_kb), its ack is within what the backup confirmed, and its
  window's right edge within the backup's (the daemon's clamps, as limits).

The limits only grow with the backup's confirmations, so an entry the
daemon has not refreshed yet is stricter, never looser. One exception: the
window limit, unlimited until the backup's first window edge arrives; the
driver writes that at once, and a segment let out in between costs the
client a resend (a clone beyond the backup's window is dropped), never a
byte. The program writes
what the daemon would have learnt from the segment (the end, ack, window,
timestamps) into the state map; the daemon reads it back before it builds
an ack of its own (PrimaryCore.absorb_fast).

Once a segment of a connection is queued, the fast path takes that
connection's segments again only when the queue holds none of them: under
a steady send the stack refills the queue as each verdict frees room (TCP
small queues count a queued packet as still in flight), so it rarely
empties. With the lag bound reached at every turn (a backup slower than
the primary), most segments stay on the queue.

What the fast path costs: the daemon never sees those bytes, so the output
digests of divergence detection are off for its connections (each ISN
message tells the backup so: ConnIsn.digests).

The backup's side is not built. A first one (branch wip/backup-fast-path)
let its socket's send queue hold what the daemon now copies; it gained no
throughput, and its takeover (one forged ACK, which moves the stack in
tests/netns/test_takeover_trigger.py) failed whenever the stack's own
timer had fired during the outage. The README tells what it found.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Optional

# -- map layouts ---------------------------------------------------------------

KEY = struct.Struct("=4sHH")  # client address, client port, server port (network order, as on the wire)
# Written by the daemon, read by the program: next_slow, seq_limit, ack_limit, win_limit, wscale, pad.
LIMITS = struct.Struct("=IIIIII")
# Written by the program, read by the daemon: next_fast, last_ack, window, tsval, tsecr, pad, packets, bytes.
STATE = struct.Struct("=IIIIIIQQ")


def key_bytes(client_ip: str, client_port: int, server_port: int) -> bytes:
    return KEY.pack(socket.inet_aton(client_ip), socket.htons(client_port), socket.htons(server_port))


@dataclass(frozen=True)
class Limits:
    """What the program allows one connection (sequence numbers in ours)."""
    next_slow: int  # where the last segment the daemon accepted ended
    seq_limit: int  # no fast byte beyond (the lag bound)
    ack_limit: int  # no fast ack beyond (what the backup confirmed)
    win_limit: int  # no fast window's right edge beyond (the backup's)
    wscale: int

    def pack(self) -> bytes:
        return LIMITS.pack(self.next_slow & 0xFFFFFFFF, self.seq_limit & 0xFFFFFFFF, self.ack_limit & 0xFFFFFFFF,
                           self.win_limit & 0xFFFFFFFF, self.wscale & 15, 0)


@dataclass(frozen=True)
class FastState:
    """What the program saw last of one connection's fast segments."""
    next_fast: int
    last_ack: int
    window: int  # as on the wire (unscaled)
    tsval: int
    tsecr: int
    packets: int
    bytes: int

    @classmethod
    def unpack(cls, data: bytes) -> "FastState":
        n, ack, win, tsval, tsecr, _pad, packets, nbytes = STATE.unpack(data)
        return cls(n, ack, win, tsval, tsecr, packets, nbytes)

    @staticmethod
    def initial(next_fast: int) -> bytes:
        return STATE.pack(next_fast & 0xFFFFFFFF, 0, 0, 0, 0, 0, 0, 0)

    def moved_to(self, next_fast: int) -> bytes:
        """This state with the program's own position brought up to ``next_fast``."""
        return STATE.pack(next_fast & 0xFFFFFFFF, self.last_ack, self.window, self.tsval, self.tsecr, 0,
                          self.packets, self.bytes)


# -- the program -----------------------------------------------------------------

# Opcodes (linux/bpf.h, bpf_common.h).
_ALU64, _ALU32, _JMP, _JMP32, _LDX, _STX, _LD = 0x07, 0x04, 0x05, 0x06, 0x01, 0x03, 0x00
_MEM, _IMM = 0x60, 0x00
_W, _H, _B, _DW = 0x00, 0x08, 0x10, 0x18
_K, _X = 0x00, 0x08
_ADD, _SUB, _AND, _LSH, _RSH, _MOV, _END = 0x00, 0x10, 0x50, 0x60, 0x70, 0xB0, 0xD0
_TO_BE = 0x08
_JA, _JEQ, _JGT, _JNE, _JSGT, _JSLE, _CALL, _EXIT = 0x00, 0x10, 0x20, 0x50, 0x60, 0xD0, 0x80, 0x90
_PSEUDO_MAP_FD = 1
FUNC_MAP_LOOKUP_ELEM, FUNC_SKB_LOAD_BYTES = 1, 26
PROG_TYPE_SOCKET_FILTER = 1
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, FP = range(11)


class _Asm:
    """A minimal eBPF assembler: instructions, and jumps to named labels."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, int, int, int, int, Optional[str]]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0, to: Optional[str] = None) -> None:
        self.ins.append((code, dst, src, off, imm, to))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def mov(self, dst: int, imm: int) -> None:
        self.op(_ALU64 | _MOV | _K, dst, imm=imm)

    def movr(self, dst: int, src: int) -> None:
        self.op(_ALU64 | _MOV | _X, dst, src)

    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        self.op(_LDX | _MEM | size, dst, src, off)

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        self.op(_STX | _MEM | size, dst, src, off)

    def be(self, dst: int, bits: int) -> None:
        self.op(_ALU32 | _END | _TO_BE, dst, imm=bits)

    def jmp(self, cond: int, dst: int, imm: int, to: str, src: Optional[int] = None, cls: int = _JMP) -> None:
        if src is None:
            self.op(cls | cond | _K, dst, imm=imm, to=to)
        else:
            self.op(cls | cond | _X, dst, src, to=to)

    def map_fd(self, dst: int, fd: int) -> None:
        self.op(_LD | _DW | _IMM, dst, _PSEUDO_MAP_FD, imm=fd)
        self.op(0)

    def call(self, func: int) -> None:
        self.op(_JMP | _CALL, imm=func)

    def exit(self) -> None:
        self.op(_JMP | _EXIT)

    def assemble(self) -> bytes:
        out = []
        for i, (code, dst, src, off, imm, to) in enumerate(self.ins):
            if to is not None:
                off = self.labels[to] - i - 1
            out.append(struct.pack("<BBhi", code, (src << 4) | dst, off, imm))
        return b"".join(out)


# The first 52 bytes of the packet (IPv4 20, TCP 20, NOP NOP TS 12) on the
# stack at fp-56; the map key at fp-64.
_PKT, _KEY = -56, -64
_HDR = 52
_HDR_NO_OPTIONS = 40  # (a connection without timestamps)


def _at(offset: int) -> int:
    return _PKT + offset


def program(limits_fd: int, state_fd: int) -> bytes:
    """The match: 1 lets the segment out now, 0 sends it to the queue."""
    a = _Asm()
    a.movr(R6, R1)
    a.movr(R1, R6)
    a.mov(R2, 0)
    a.movr(R3, FP)
    a.op(_ALU64 | _ADD | _K, R3, imm=_PKT)
    a.mov(R4, _HDR)
    a.call(FUNC_SKB_LOAD_BYTES)  # fails (non-zero) for a packet shorter than that
    a.jmp(_JNE, R0, 0, "queue")
    a.ldx(_B, R2, FP, _at(0))
    a.jmp(_JNE, R2, 0x45, "queue")  # IPv4, no options
    a.ldx(_H, R2, FP, _at(6))
    a.op(_ALU64 | _AND | _K, R2, imm=0xFF3F)  # (on the wire 0x3FFF: MF and the fragment offset)
    a.jmp(_JNE, R2, 0, "queue")
    a.ldx(_B, R2, FP, _at(9))
    a.jmp(_JNE, R2, 6, "queue")
    a.mov(R7, _HDR_NO_OPTIONS)
    a.ldx(_B, R2, FP, _at(32))
    a.op(_ALU64 | _RSH | _K, R2, imm=4)
    a.jmp(_JEQ, R2, 5, "layout_ok")  # a TCP header without options (a connection without timestamps),
    a.jmp(_JNE, R2, 8, "queue")  # or of 32 bytes...
    a.ldx(_W, R2, FP, _at(40))
    a.jmp(_JNE, R2, 0x0A080101, "queue")  # ...whose options are NOP NOP TS: no SACK blocks
    a.mov(R7, _HDR)
    a.label("layout_ok")
    a.ldx(_B, R2, FP, _at(33))
    a.jmp(_JEQ, R2, 0x10, "flags_ok")
    a.jmp(_JNE, R2, 0x18, "queue")  # ACK or ACK|PSH only
    a.label("flags_ok")
    a.ldx(_H, R2, FP, _at(2))
    a.be(R2, 16)
    a.op(_ALU64 | _SUB | _X, R2, R7)  # payload length (headers: 40 or 52 bytes)
    a.movr(R7, R2)
    a.jmp(_JSLE, R7, 0, "queue")
    a.ldx(_W, R2, FP, _at(16))  # key: client address, client port, server port
    a.stx(_W, FP, _KEY, R2)
    a.ldx(_H, R2, FP, _at(22))
    a.stx(_H, FP, _KEY + 4, R2)
    a.ldx(_H, R2, FP, _at(20))
    a.stx(_H, FP, _KEY + 6, R2)
    for fd, dst in ((limits_fd, R8), (state_fd, R9)):  # each entry's value, or to the queue
        a.map_fd(R1, fd)
        a.movr(R2, FP)
        a.op(_ALU64 | _ADD | _K, R2, imm=_KEY)
        a.call(FUNC_MAP_LOOKUP_ELEM)
        a.jmp(_JEQ, R0, 0, "queue")
        a.movr(dst, R0)
    a.ldx(_W, R2, FP, _at(24))
    a.be(R2, 32)  # seq
    a.ldx(_W, R3, R9, 0)  # where the last fast segment ended,
    a.ldx(_W, R4, R8, 0)  # or the last one the daemon accepted, whichever is later
    a.op(_ALU32 | _MOV | _X, R5, R3)
    a.op(_ALU32 | _SUB | _X, R5, R4)  # how far the fast one is ahead:
    a.jmp(_JSLE, R5, 0, "daemons", cls=_JMP32)
    a.jmp(_JGT, R5, 1 << 30, "daemons", cls=_JMP32)  # (further is an old one, wrapped round)
    a.jmp(_JA, 0, 0, "expected")
    a.label("daemons")
    a.movr(R3, R4)
    a.label("expected")
    a.jmp(_JNE, R2, 0, "queue", src=R3)  # (a resend is never next: it goes to the queue)
    a.op(_ALU32 | _MOV | _X, R4, R2)
    a.op(_ALU32 | _ADD | _X, R4, R7)  # end
    a.ldx(_W, R3, R8, 4)
    a.op(_ALU32 | _MOV | _X, R5, R4)
    a.op(_ALU32 | _SUB | _X, R5, R3)
    a.jmp(_JSGT, R5, 0, "queue", cls=_JMP32)  # beyond the lag bound
    a.ldx(_W, R5, FP, _at(28))
    a.be(R5, 32)  # ack
    a.ldx(_W, R3, R8, 8)
    a.op(_ALU32 | _MOV | _X, R0, R5)
    a.op(_ALU32 | _SUB | _X, R0, R3)
    a.jmp(_JSGT, R0, 0, "queue", cls=_JMP32)  # an ack the backup has not confirmed
    a.ldx(_H, R1, FP, _at(34))
    a.be(R1, 16)  # window, unscaled
    a.ldx(_W, R3, R8, 16)
    a.op(_ALU64 | _AND | _K, R3, imm=15)
    a.movr(R0, R1)
    a.op(_ALU64 | _LSH | _X, R0, R3)
    a.op(_ALU32 | _ADD | _X, R0, R5)
    a.ldx(_W, R3, R8, 12)
    a.op(_ALU32 | _SUB | _X, R0, R3)
    a.jmp(_JSGT, R0, 0, "queue", cls=_JMP32)  # a window beyond the backup's
    a.stx(_W, R9, 0, R4)
    a.stx(_W, R9, 4, R5)
    a.stx(_W, R9, 8, R1)
    a.ldx(_B, R2, FP, _at(32))
    a.op(_ALU64 | _RSH | _K, R2, imm=4)
    a.jmp(_JEQ, R2, 5, "counts")  # (no options: no timestamps to keep)
    a.ldx(_W, R2, FP, _at(44))
    a.be(R2, 32)
    a.stx(_W, R9, 12, R2)
    a.ldx(_W, R2, FP, _at(48))
    a.be(R2, 32)
    a.stx(_W, R9, 16, R2)
    a.label("counts")
    a.ldx(_DW, R2, R9, 24)
    a.op(_ALU64 | _ADD | _K, R2, imm=1)
    a.stx(_DW, R9, 24, R2)
    a.ldx(_DW, R2, R9, 32)
    a.op(_ALU64 | _ADD | _X, R2, R7)
    a.stx(_DW, R9, 32, R2)
    a.mov(R0, 1)
    a.exit()
    a.label("queue")
    a.mov(R0, 0)
    a.exit()
    return a.assemble()


def rule(chain: str, vip: str, ports: str, mark: int, pinned: str) -> str:
    """The iptables-restore line in front of the primary's queue rule."""
    return "-A %s -s %s/32 -p tcp -m multiport --sports %s -m mark ! --mark 0x%x -m bpf --object-pinned %s -j ACCEPT" \
        % (chain, vip, ports, mark, pinned)
