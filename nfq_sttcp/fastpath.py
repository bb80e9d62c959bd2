"""The primary's kernel fast path: eBPF programs, run by ``bpf`` iptables
matches, that let a client-bound data segment go straight out when the
daemon would only have accepted it unchanged, and hold one back in the
kernel when only the lag bound stops it (pure: the programs' instructions,
the maps' byte layouts, the kick; bpf.py loads them, the driver keeps the
maps current).

A segment takes the fast path only if all of these hold, else the gate
(below) or the queue has it:

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
* it ends within the lag bound (PrimaryCore.lag_limit: the backup's output
  position plus max_backup_lag_kb, or plus what the backup writes in
  max_backup_lag_ms at its pace), its ack is within what the backup confirmed, and its
  window's right edge within the backup's and not below the edge the
  client was already shown (the daemon's clamps, as limits).

The limits only grow with the backup's confirmations (the lag bound never
moves back, even when the backup's pace drops), so an entry the
daemon has not refreshed yet is stricter, never looser. One exception: the
window limit, unlimited until the backup's first window edge arrives; the
driver writes that at once, and a segment let out in between costs the
client a resend (a clone beyond the backup's window is dropped), never a
byte. The program writes
what the daemon would have learnt from the segment (the end, ack, window,
timestamps) into the state map; the daemon reads it back before it builds
an ack of its own (PrimaryCore.absorb_fast).

A segment next in order that ends beyond the lag bound is not queued (its
ack and window are no matter: it is not sent): a second program
(``gate``), in a DROP rule after the first, drops it in the kernel.
A locally made packet dropped by netfilter reports an error (EPERM) to TCP,
which keeps the segment unsent at the head of its queue and tries it again
when the next ack arrives; so the gate holds the stream back without the
daemon, and nothing can overtake the held segment. Queuing it instead, as
before, cost most of the gain: once a connection has a segment on the
queue every later one must follow it there, and under a steady send the
stack refills the queue as each verdict frees room (TCP small queues count
a queued packet as still in flight), so it rarely emptied while the lag
bound was reached at every turn.

When the client has acked everything, no ack will come to retry the held
segment (the stack would wait for its zero-window probe timer, 200 ms or
more, doubled after each try the gate drops). So a third program
(``recorder``), a match that never matches, in the primary's PREROUTING,
keeps each connection's latest client ack, and when the daemon raises the
lag bound of a connection with nothing in flight and a segment held at its
output's end, or drops its entries, it injects a copy of that ack into its own
stack (``kick``): a duplicate ack, which changes nothing in TCP but makes
it try to send again. The recorder runs before TCP has checked anything
(the checksum included), so the kick takes from it only what it can check
(an ack equal to what we sent; the recorder keeps none beyond that) and
the window; its sequence number and timestamp are the ones our stack
itself last sent as its ack and echo.

The gate holds a segment only while the daemon renews its lease (a
deadline in a map, ``LEASE``): a killed daemon leaves segments to the
queue rule, which passes them (--queue-bypass), as without a fast path.
It also gives up on a segment held longer than its patience (half of the
daemon's lag hold, 1 s; the stack tries again at its next ack, kick or
probe): then it goes to the queue, where the daemon holds it and gives the
connection up when the backup still does not follow (after its lag hold,
2 s, counted from there).

What the fast path costs: the daemon never sees those bytes, so the output
digests of divergence detection are off for its connections (each ISN
message tells the backup so: ConnIsn.digests).

The backup's output side is not built (its input: fastin.py). A first
one (branch wip/backup-fast-path) let its socket's send queue hold what
the daemon now copies; it gained no
throughput, and its takeover (one forged ACK, which moves the stack in
tests/netns/test_takeover_trigger.py) failed whenever the stack's own
timer had fired during the outage. The README tells what it found.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Optional

from . import tcpseg

# -- map layouts ---------------------------------------------------------------

KEY = struct.Struct("=4sHH")  # client address, client port, server port (network order, as on the wire)
# Written by the daemon, read by the program: next_slow, seq_limit, ack_limit, win_limit, wscale, win_floor.
LIMITS = struct.Struct("=IIIIII")
# Written by the program, read by the daemon: next_fast, last_ack, window, tsval, tsecr, pad, packets, bytes.
STATE = struct.Struct("=IIIIIIQQ")
# Written by the recorder (the client's latest ack: ack, valid, the end of
# its segment, window as on the wire, pad) and by the gate (the segment it
# holds, pad, and since when, CLOCK_MONOTONIC ns).
CLIENT = struct.Struct("=IIIHHIIQ")
KICK_MARGIN = 1 << 20  # no segment is longer: a bound further than this past what was sent held nothing
# The daemon's lease: the gate holds segments until this CLOCK_MONOTONIC ns.
LEASE_KEY = b"\0\0\0\0"
LEASE = struct.Struct("=Q")


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
    win_floor: Optional[int] = None  # nor below (the edge the client was shown: windows never shrink)

    def pack(self) -> bytes:
        # No floor: any edge up to 2**30 below the acks allowed (the signed test's reach).
        floor = (self.ack_limit - (1 << 30)) if self.win_floor is None else self.win_floor
        return LIMITS.pack(self.next_slow & 0xFFFFFFFF, self.seq_limit & 0xFFFFFFFF, self.ack_limit & 0xFFFFFFFF,
                           self.win_limit & 0xFFFFFFFF, self.wscale & 15, floor & 0xFFFFFFFF)


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


@dataclass(frozen=True)
class ClientAck:
    """The client's latest ack of one connection, as the recorder saw it."""
    ack: int
    valid: bool  # (False until the first ack after the entry was made)
    seq_end: int
    window: int  # as on the wire
    held: Optional[int] = None  # where the segment the gate last held starts, if it held one

    @classmethod
    def unpack(cls, data: bytes) -> "ClientAck":
        ack, valid, seq_end, window, _pad, held, _pad2, since = CLIENT.unpack(data)
        return cls(ack, bool(valid), seq_end, window, held if since else None)

    @staticmethod
    def initial() -> bytes:
        return CLIENT.pack(0, 0, 0, 0, 0, 0, 0, 0)


def left_behind(next_slow: int, next_fast: int) -> bool:
    """Has the program's own position fallen 256 MB or more behind the
    daemon's (nothing went fast for that long)? It must be brought up
    before it wraps round to look ahead: the programs trust it within 1 GB
    ahead of the daemon's (sent_up_to; fastin.py uses the same rule)."""
    return 1 << 28 < (next_slow - next_fast) & 0xFFFFFFFF < 1 << 31


def sent_up_to(limits: Limits, state: FastState) -> int:
    """Where our stack's output ends: the later of the program's and the
    daemon's positions (the program's counts only up to 1 GB ahead)."""
    ahead = (state.next_fast - limits.next_slow) & 0xFFFFFFFF
    return state.next_fast if 0 < ahead <= 1 << 30 else limits.next_slow


def may_have_held(sent: int, seq_limit: int) -> bool:
    """Could the gate hold a segment starting at ``sent`` under this lag bound?"""
    return 0 < (sent + KICK_MARGIN - seq_limit) & 0xFFFFFFFF < 1 << 31


def kick(key: tuple[str, int, str, int], client: ClientAck, sent: int, rcv_nxt: int, has_ts: bool,
         ts_recent: int, our_tsval: int) -> Optional[bytes]:
    """The duplicate of the client's latest ack that makes our stack try a
    held segment again, or None when one would not be right: the gate holds
    nothing where our output ends, or the client has not acked everything
    we sent (its next ack retries the segment, and a duplicate ack with data
    in flight counts towards a fast retransmit on a connection without SACK).

    Only the ack and the window come from the recorder, which sees segments
    before TCP checks them: the ack must equal what we sent (the recorder
    keeps none beyond it), and a window we got wrong only moves the send
    window at worst. The sequence number is our stack's last ack
    (``rcv_nxt``) and the timestamp the client's TSval it last echoed
    (``ts_recent``): a corrupted TSval in a segment the stack went on to
    drop would otherwise reach it through the kick and fail every later
    segment of the client's (PAWS). An echo a little older than the
    stack's latest passes as a disordered ack (``tcp_disordered_ack``)."""
    if not client.valid or client.ack != sent & 0xFFFFFFFF or client.held != sent & 0xFFFFFFFF:
        return None
    opts = tcpseg.ts_option(ts_recent, our_tsval) if has_ts else b""
    cip, cport, sip, sport = key
    return tcpseg.build_segment(cip, sip, cport, sport, rcv_nxt, client.ack, tcpseg.ACK, client.window, opts)


# -- the program -----------------------------------------------------------------

# Opcodes (linux/bpf.h, bpf_common.h).
_ALU64, _ALU32, _JMP, _JMP32, _LDX, _STX, _LD = 0x07, 0x04, 0x05, 0x06, 0x01, 0x03, 0x00
_MEM, _IMM = 0x60, 0x00
_W, _H, _B, _DW = 0x00, 0x08, 0x10, 0x18
_K, _X = 0x00, 0x08
_ADD, _SUB, _AND, _LSH, _RSH, _MOV, _END = 0x00, 0x10, 0x50, 0x60, 0x70, 0xB0, 0xD0
_TO_BE = 0x08
_JA, _JEQ, _JGT, _JNE, _JSGT, _JSLT, _JSLE, _CALL, _EXIT = 0x00, 0x10, 0x20, 0x50, 0x60, 0xC0, 0xD0, 0x80, 0x90
_PSEUDO_MAP_FD = 1
FUNC_MAP_LOOKUP_ELEM, FUNC_KTIME_GET_NS, FUNC_SKB_LOAD_BYTES = 1, 5, 26
PROG_TYPE_SOCKET_FILTER = 1
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, FP = range(11)


def _s32(x: int) -> int:
    """The low 32 bits of ``x`` as the signed immediate field holds them."""
    return ((x & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000


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

    def ld_imm64(self, dst: int, value: int) -> None:
        self.op(_LD | _DW | _IMM, dst, imm=_s32(value))
        self.op(0, imm=_s32(value >> 32))

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


def _next_in_order(a: _Asm, limits_fd: int, state_fd: int) -> None:
    """What both programs test first: the layout, the flags, a payload, the
    connection's entries and its order. On to the caller with the sequence
    number in R2, the end in R4, the end minus the lag bound in R5 (signed),
    the payload length in R7 and the entries in R8 (limits) and R9 (state);
    anything else jumps to "queue"."""
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
        _lookup(a, fd, _KEY, "queue")
        a.movr(dst, R0)
    a.ldx(_W, R2, FP, _at(24))
    a.be(R2, 32)  # seq
    _sent(a, R8, R9, R1)
    a.jmp(_JNE, R2, 0, "queue", src=R1)  # (a resend is never next: it goes to the queue)
    a.op(_ALU32 | _MOV | _X, R4, R2)
    a.op(_ALU32 | _ADD | _X, R4, R7)  # end
    a.ldx(_W, R3, R8, 4)
    a.op(_ALU32 | _MOV | _X, R5, R4)
    a.op(_ALU32 | _SUB | _X, R5, R3)


def program(limits_fd: int, state_fd: int) -> bytes:
    """The match: 1 lets the segment out now, 0 sends it to the queue."""
    a = _Asm()
    _next_in_order(a, limits_fd, state_fd)
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
    a.op(_ALU32 | _ADD | _X, R0, R3)  # (the edge again)
    a.ldx(_W, R3, R8, 20)
    a.op(_ALU32 | _SUB | _X, R0, R3)
    a.jmp(_JSLT, R0, 0, "queue", cls=_JMP32)  # an edge below the one the client was shown
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
    return _exits(a)


def _sent(a: _Asm, limits: int, state: int, dst: int) -> None:
    """``dst`` (not R3-R5, which it clobbers) = where our output ends
    (sent_up_to): where the last fast segment ended, or the last one the
    daemon accepted, whichever is later."""
    assert dst not in (R3, R4, R5)
    a.ldx(_W, R3, state, 0)
    a.ldx(_W, R4, limits, 0)
    a.op(_ALU32 | _MOV | _X, R5, R3)
    a.op(_ALU32 | _SUB | _X, R5, R4)  # how far the fast one is ahead:
    a.op(_ALU32 | _MOV | _X, dst, R4)
    a.jmp(_JSLE, R5, 0, "sent_%d" % dst, cls=_JMP32)
    a.jmp(_JGT, R5, 1 << 30, "sent_%d" % dst, cls=_JMP32)  # (further is an old one, wrapped round)
    a.op(_ALU32 | _MOV | _X, dst, R3)
    a.label("sent_%d" % dst)


def _lookup(a: _Asm, fd: int, key_at: int, missing: str) -> None:
    """R0 = the entry of the key at fp+``key_at``, or on to ``missing``."""
    a.map_fd(R1, fd)
    a.movr(R2, FP)
    a.op(_ALU64 | _ADD | _K, R2, imm=key_at)
    a.call(FUNC_MAP_LOOKUP_ELEM)
    a.jmp(_JEQ, R0, 0, missing)


def _exits(a: _Asm, label: str = "queue") -> bytes:
    """Return 1 where the code falls through, 0 at ``label``."""
    a.mov(R0, 1)
    a.exit()
    a.label(label)
    a.mov(R0, 0)
    a.exit()
    return a.assemble()


def gate(limits_fd: int, state_fd: int, client_fd: int, lease_fd: int, patience_ns: int) -> bytes:
    """The match of the DROP rule after the fast one: 1 holds the segment
    back (TCP sends it again later), 0 sends it to the queue. It holds a
    segment next in order that ends beyond the lag bound, while the
    daemon's lease runs, for at most ``patience_ns``, and only once the
    recorder has the client's ack (without it no kick could be built)."""
    a = _Asm()
    _next_in_order(a, limits_fd, state_fd)
    a.jmp(_JSLE, R5, 0, "queue", cls=_JMP32)  # within the lag bound: the fast rule's or the queue's
    a.op(_ALU32 | _MOV | _X, R7, R2)  # the sequence number, kept across the calls
    _lookup(a, client_fd, _KEY, "queue")
    a.movr(R9, R0)
    a.ldx(_W, R3, R9, 4)
    a.jmp(_JEQ, R3, 0, "queue")  # no client ack recorded yet
    a.mov(R3, 0)
    a.stx(_W, FP, -4, R3)
    _lookup(a, lease_fd, -4, "queue")
    a.ldx(_DW, R8, R0, 0)
    a.call(FUNC_KTIME_GET_NS)
    a.movr(R6, R0)
    a.jmp(_JGT, R6, 0, "queue", src=R8)  # the daemon has not renewed its lease: it may be dead
    a.ldx(_W, R3, R9, 16)
    a.jmp(_JNE, R3, 0, "first", src=R7)
    a.ldx(_DW, R3, R9, 24)
    a.jmp(_JEQ, R3, 0, "first")
    a.movr(R4, R6)
    a.op(_ALU64 | _SUB | _X, R4, R3)
    a.ld_imm64(R5, patience_ns)
    a.jmp(_JGT, R4, 0, "queue", src=R5)  # held too long: the daemon decides
    a.jmp(_JA, 0, 0, "hold")
    a.label("first")  # a new segment held: since now
    a.stx(_W, R9, 16, R7)
    a.stx(_DW, R9, 24, R6)
    a.label("hold")
    return _exits(a)


def recorder(limits_fd: int, state_fd: int, client_fd: int) -> bytes:
    """A match that never matches, in front of the primary's stack: it
    keeps the latest ack of each client that has an entry (CLIENT), so that
    the daemon knows when nothing is in flight and can build a kick. An ack
    beyond what we sent is not kept (our stack drops it, and a kick must
    never carry more than the client acked)."""
    a = _Asm()
    ip, tcp = -56, -32  # the IPv4 header, the TCP header
    a.movr(R6, R1)
    a.movr(R1, R6)
    a.mov(R2, 0)
    a.movr(R3, FP)
    a.op(_ALU64 | _ADD | _K, R3, imm=ip)
    a.mov(R4, 20)
    a.call(FUNC_SKB_LOAD_BYTES)
    a.jmp(_JNE, R0, 0, "out")
    a.ldx(_B, R2, FP, ip)
    a.movr(R3, R2)
    a.op(_ALU64 | _RSH | _K, R3, imm=4)
    a.jmp(_JNE, R3, 4, "out")
    a.op(_ALU64 | _AND | _K, R2, imm=15)
    a.op(_ALU64 | _LSH | _K, R2, imm=2)
    a.movr(R7, R2)  # IP header length (options allowed)
    a.ldx(_B, R2, FP, ip + 9)
    a.jmp(_JNE, R2, 6, "out")
    a.ldx(_H, R2, FP, ip + 6)
    a.op(_ALU64 | _AND | _K, R2, imm=0xFF3F)
    a.jmp(_JNE, R2, 0, "out")
    a.ldx(_W, R2, FP, ip + 12)
    a.stx(_W, FP, _KEY, R2)  # client address
    a.ldx(_H, R9, FP, ip + 2)
    a.be(R9, 16)
    a.op(_ALU64 | _SUB | _X, R9, R7)  # TCP length
    a.movr(R1, R6)
    a.movr(R2, R7)
    a.movr(R3, FP)
    a.op(_ALU64 | _ADD | _K, R3, imm=tcp)
    a.mov(R4, 20)
    a.call(FUNC_SKB_LOAD_BYTES)
    a.jmp(_JNE, R0, 0, "out")
    a.ldx(_B, R2, FP, tcp + 13)
    a.op(_ALU64 | _AND | _K, R2, imm=0x10)
    a.jmp(_JEQ, R2, 0, "out")  # no ACK flag
    a.ldx(_H, R2, FP, tcp)
    a.stx(_H, FP, _KEY + 4, R2)
    a.ldx(_H, R2, FP, tcp + 2)
    a.stx(_H, FP, _KEY + 6, R2)
    a.ldx(_B, R2, FP, tcp + 12)
    a.op(_ALU64 | _RSH | _K, R2, imm=4)
    a.op(_ALU64 | _LSH | _K, R2, imm=2)  # TCP header length
    a.op(_ALU64 | _SUB | _X, R9, R2)  # payload length
    a.ldx(_W, R3, FP, tcp + 4)
    a.be(R3, 32)
    a.op(_ALU32 | _ADD | _X, R9, R3)  # where the segment ends,
    a.ldx(_B, R3, FP, tcp + 13)
    a.op(_ALU64 | _AND | _K, R3, imm=0x01)
    a.op(_ALU32 | _ADD | _X, R9, R3)  # its FIN included
    a.stx(_W, FP, -8, R9)
    _lookup(a, limits_fd, _KEY, "out")  # (not a connection of the fast path)
    a.movr(R7, R0)
    _lookup(a, state_fd, _KEY, "out")
    a.movr(R6, R0)
    _sent(a, R7, R6, R7)
    a.ldx(_W, R8, FP, tcp + 8)
    a.be(R8, 32)  # ack
    a.op(_ALU32 | _MOV | _X, R4, R8)
    a.op(_ALU32 | _SUB | _X, R4, R7)
    a.jmp(_JSGT, R4, 0, "out", cls=_JMP32)  # beyond what we sent: not one our stack takes
    _lookup(a, client_fd, _KEY, "out")
    a.ldx(_W, R9, FP, -8)
    a.ldx(_W, R3, R0, 4)
    a.jmp(_JEQ, R3, 0, "store")
    a.ldx(_W, R3, R0, 0)
    a.op(_ALU32 | _MOV | _X, R4, R8)
    a.op(_ALU32 | _SUB | _X, R4, R3)
    a.jmp(_JSGT, R4, 0, "store", cls=_JMP32)  # a later ack
    a.jmp(_JNE, R4, 0, "out", cls=_JMP32)  # an older one (reordered): keep ours
    a.ldx(_W, R3, R0, 8)
    a.op(_ALU32 | _MOV | _X, R4, R9)
    a.op(_ALU32 | _SUB | _X, R4, R3)
    a.jmp(_JSLT, R4, 0, "out", cls=_JMP32)  # the same ack from an earlier segment
    a.label("store")  # (the same ack and end: a window update, or a duplicate)
    a.stx(_W, R0, 0, R8)
    a.mov(R3, 1)
    a.stx(_W, R0, 4, R3)
    a.stx(_W, R0, 8, R9)
    a.ldx(_H, R3, FP, tcp + 14)
    a.be(R3, 16)
    a.stx(_H, R0, 12, R3)
    a.label("out")
    a.mov(R0, 0)
    a.exit()
    return a.assemble()


@dataclass(frozen=True)
class Pins:
    """Where the daemon pins its three programs, for the rules to name."""
    fast: str

    @property
    def gate(self) -> str:
        return self.fast + "-gate"

    @property
    def recorder(self) -> str:
        return self.fast + "-recorder"


def _match(pinned: str) -> str:
    return "-m bpf --object-pinned %s" % pinned


def rules(out_chain: str, in_chain: str, lan_if: str, vip: str, ports: str, mark: int,
          pins: Pins) -> tuple[list[str], list[str]]:
    """The iptables-restore lines: in front of the primary's queue rule (the
    fast one, then the gate's), and for its client segments (the recorder's,
    no target)."""
    sel = "-s %s/32 -p tcp -m multiport --sports %s -m mark ! --mark 0x%x" % (vip, ports, mark)
    return (["-A %s %s %s -j ACCEPT" % (out_chain, sel, _match(pins.fast)),
             "-A %s %s %s -j DROP" % (out_chain, sel, _match(pins.gate))],
            ["-A %s -i %s -d %s/32 -p tcp -m multiport --dports %s %s" % (in_chain, lan_if, vip, ports,
                                                                           _match(pins.recorder))])
