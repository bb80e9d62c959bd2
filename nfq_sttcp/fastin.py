"""The backup's kernel path for client segments (``tuning.fast_inbound``):
a tc program on the interface the primary's clones arrive on that maps a
clone into the backup's space itself, so that it never waits for the
daemon (pure: the program's instructions and the maps' byte layouts;
bpf.py loads it, the driver attaches it and keeps the map current).

An upload sends the daemon a whole GSO packet (up to 64 KB) per clone, and
the verdict copies it back, only to change two header fields: the ack
(``-= delta_seq``) and the timestamp echo (``-= delta_ts``). Measured on an
unshaped 200 MB upload: the backup's daemon spent 46% of its samples on its
inbound queue, most of it in that verdict. A request-response client's
requests cost the daemon a wake-up each, on CPUs the primary's answers
wait for.

The program maps a segment only where the daemon's own mapping is known in
advance, and leaves every other one to the queue, unchanged:

* an IPv4 frame without IP options, not a fragment, to the VIP; TCP with
  exactly the timestamp option (NOP NOP TS, so no SACK blocks and no
  connection without timestamps), flags ACK or ACK|PSH, a payload, and a
  timestamp echo that is not 0;
* its connection has an entry (the daemon writes one only while the
  connection is mapped, our stack past its handshake, no FIN or RST seen,
  the last segment it mapped itself one the program would have mapped,
  not after takeover: BackupCore.fast_in_entry; protected or not, the
  mapping before takeover is the same);
* its ack is no older than the client's latest the daemon knows or the
  program mapped, and no further beyond it than the daemon trusts
  (BackupCore._acceptable: our output and the primary's lag bound);
* next in order: it starts where the later of two ended, the last segment
  the program mapped and the last one the daemon accepted (fastpath._sent's
  rule: a queued segment makes every later one miss, so none overtakes it);
* it starts within our receive window as the daemon last knew it (a stale
  edge is only stricter: ours only moves on).

The ack is mapped as the daemon maps it: ``ack - delta_seq`` up to where our
output ends, as the daemon last saw it; beyond, clamped there (DESIGN.md
trap 9), with the window widened by what the ack lost so that the right
edge stays where the client put it (BackupConn.window_below). An echo
request usually arrives before our own answer to the one before is out,
so its ack is clamped. A stale end only clamps lower than the daemon
would now: the daemon, reading back what the program showed our stack,
acks the rest into it (a self-ack).

Pure acks (a download's) go to the daemon: mapping them here gained
nothing (their cost is our stack's work on them, which stays), and the
entry they need follows our output, a map write for each segment of
ours. So a pure ack ends the entry until the client sends data again.

The checksum is patched for the fields changed (bpf_l4_csum_replace), not
summed afresh: a clone damaged on the sync link stays damaged, and our
stack drops it, where the daemon drops it too (tcpseg.changed_on_a_link).
The mapped frame carries the config's mark, which the queue rule skips
(our injections carry it already). What the daemon needs of those segments
it reads from the state map: the client's latest TSval (its self-acks must
echo the newest, or our stack drops them, PAWS), the highest of our
TSvals it echoed (the floor of our TSvals after takeover), the client's
latest ack with the window beside it (the daemon frees its held copies up
to it, and drops what our stack sends that the client already has), and
the highest ack our stack was shown. At takeover the
driver switches the program off first (ON_KEY: one map write), reads back
what it saw, and detaches it after the resends (tc takes milliseconds).

A daemon that dies leaves the program running on its last entries: it maps
what the daemon would have mapped the same way; our stack's replies still
go to a queue nobody reads, which drops them (the backup fails closed).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from .fastpath import (_ADD, _ALU32, _ALU64, _AND, _B, _DW, _H, _JA, _JEQ, _JGT, _JMP32, _JNE, _JSGT, _JSLE, _JSLT, _K,
                       _LSH, _MOV, _RSH, _SUB, _W, _X, FP, FUNC_SKB_LOAD_BYTES, KEY, R0, R1, R2, R3, R4, R5, R6, R7, R8,
                       R9, _Asm, _lookup, _s32, _sent, key_bytes)

__all__ = ["KEY", "LIMITS", "STATE", "InLimits", "InState", "key_bytes", "program", "PROG_TYPE_SCHED_CLS"]

PROG_TYPE_SCHED_CLS = 3
_OR = 0x40
FUNC_SKB_STORE_BYTES, FUNC_L4_CSUM_REPLACE, FUNC_CSUM_LEVEL = 9, 11, 135
_CSUM_LEVEL_QUERY = 0
# (UNSPEC: on to any later filter of someone else's, then accepted.)
TC_ACT_UNSPEC, TC_ACT_SHOT = -1, 2
SKB_PKT_TYPE, SKB_MARK = 4, 8  # offsetof(struct __sk_buff, ...)
PACKET_HOST = 0
# A one-entry map: the program maps only while this key is in it. At
# takeover the driver deletes it (one write), before it detaches the program.
ON_KEY = b"\0\0\0\0"

# Written by the daemon, read by the program: next_slow, ack (the primary's
# space), room, delta_seq, delta_ts, rcv_hi, ahead, shift.
LIMITS = struct.Struct("=IIIIIIII")
# Written by the program, read by the daemon: next_fast, tsval, tsecr, valid,
# ack, window (the client's, as it sent them), shown (ours), pad, packets,
# bytes.
STATE = struct.Struct("=IIIIIIIIQQ")

# Frame offsets: Ethernet (a tc program on an Ethernet link sees the frame),
# IPv4 without options, TCP with NOP NOP TS.
_IP, _TCP = 14, 34
_TSVAL, _TSECR = _TCP + 24, _TCP + 28
_FRAME = _TCP + 32  # 66 bytes read
_HEADERS = 52  # IPv4 20 + TCP 32
_CSUM = _TCP + 16
# The frame's first bytes on the stack at fp-74 (its IP header 4-aligned:
# the verifier refuses a misaligned load); the key at fp-88; the end of the
# segment at fp-8; a scratch word at fp-4; the mapped ack at fp-92, whether
# it was clamped at fp-96, and the frame's word with the widened window at
# fp-100.
_P, _KEY_AT, _END_AT, _SCRATCH = -74, -88, -8, -4
_SHOWN_AT, _CLAMPED_AT, _WINDOW_WORD_AT = -92, -96, -100


@dataclass(frozen=True)
class InLimits:
    """What the program may map of one connection."""
    next_slow: int  # where the last segment the daemon accepted ended (client space)
    ack: int  # the client's latest ack the daemon knows (the primary's space): none older is mapped
    room: int  # how far beyond ``ack`` our output ends (negative: it ends short of it); beyond, acks are clamped
    delta_seq: int  # the primary's sequence numbers minus ours
    delta_ts: int  # the primary's TSval minus ours
    rcv_hi: int  # no segment starting beyond this (our receive window, with slack)
    ahead: int  # no ack further beyond ``ack`` than this (the core's trust: our output and the lag bound)
    shift: int  # the client's window scale (a clamped ack's window is widened by what it lost)

    def pack(self) -> bytes:
        m = 0xFFFFFFFF
        return LIMITS.pack(self.next_slow & m, self.ack & m, self.room & m, self.delta_seq & m,
                           self.delta_ts & m, self.rcv_hi & m, self.ahead & m, self.shift)


@dataclass(frozen=True)
class InState:
    """What the program saw last of one connection's segments."""
    next_fast: int
    tsval: int  # the newest client TSval (valid only if ``valid``)
    tsecr: int  # the highest echo of the primary's TSvals
    valid: bool
    ack: int  # the client's latest ack (the primary's space)
    window: int  # the client's window field beside it
    shown: int  # the highest ack shown to our stack (ours; clamped)
    packets: int
    bytes: int

    @classmethod
    def unpack(cls, data: bytes) -> "InState":
        n, tsval, tsecr, valid, ack, window, shown, _pad, packets, nbytes = STATE.unpack(data)
        return cls(n, tsval, tsecr, bool(valid), ack, window, shown, packets, nbytes)

    @staticmethod
    def initial(next_fast: int) -> bytes:
        return STATE.pack(next_fast & 0xFFFFFFFF, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    def moved_to(self, next_fast: int) -> bytes:
        """This state with the program's own position brought up to ``next_fast``."""
        return STATE.pack(next_fast & 0xFFFFFFFF, self.tsval, self.tsecr, int(self.valid), self.ack, self.window,
                          self.shown, 0, self.packets, self.bytes)


def _at(offset: int) -> int:
    return _P + offset


def _max_into(a: _Asm, state_off: int, name: str, frame_off: Optional[int] = None, equal_too: bool = False,
              also: Optional[Callable[[], None]] = None) -> None:
    """state[state_off] = a sequence-like 32-bit number: the frame's field at
    ``frame_off``, or R2 as it is, if later than what is there (or, with
    ``equal_too``, as late), or if nothing valid is there (state[12]);
    ``also`` adds more stores beside it."""
    if frame_off is not None:
        a.ldx(_W, R2, FP, _at(frame_off))
        a.be(R2, 32)
    a.ldx(_W, R4, R9, 12)
    a.jmp(_JEQ, R4, 0, name)
    a.ldx(_W, R3, R9, state_off)
    a.op(_ALU32 | _MOV | _X, R5, R2)
    a.op(_ALU32 | _SUB | _X, R5, R3)
    a.jmp(_JSLT if equal_too else _JSLE, R5, 0, name + "_kept", cls=_JMP32)
    a.label(name)
    a.stx(_W, R9, state_off, R2)
    if also is not None:
        also()
    a.label(name + "_kept")


def _checked_or_unfinished(a: _Asm) -> None:
    """On to "pass" unless the kernel checked the frame's TCP checksum
    (CHECKSUM_UNNECESSARY) or the frame never went over a wire finished (the
    field holds only the pseudo-header sum, as a local stack leaves it and a
    veth carries it: tcpseg.checksum_state). Any other frame (one a NIC
    summed, CHECKSUM_COMPLETE, or none) goes to the daemon, which drops it if
    it changed on a link before its values reach our state; the program
    would keep them (the client's TSval: a bad one echoed in a self-ack
    fails every later segment at our stack, PAWS). R7 holds the payload
    length."""
    # The folded pseudo-header sum, in the halfwords' byte order as loaded
    # (a ones' complement sum is the same either way round, byte-swapped).
    a.ldx(_H, R2, FP, _at(_IP + 12))
    for off in (14, 16, 18):
        a.ldx(_H, R3, FP, _at(_IP + off))
        a.op(_ALU64 | _ADD | _X, R2, R3)
    a.op(_ALU64 | _ADD | _K, R2, imm=0x0600)  # protocol 6
    a.movr(R3, R7)
    a.op(_ALU64 | _ADD | _K, R3, imm=_HEADERS - 20)  # the TCP length
    a.be(R3, 16)
    a.op(_ALU64 | _ADD | _X, R2, R3)
    for _ in range(2):
        a.movr(R3, R2)
        a.op(_ALU64 | _RSH | _K, R3, imm=16)
        a.op(_ALU64 | _AND | _K, R2, imm=0xFFFF)
        a.op(_ALU64 | _ADD | _X, R2, R3)
    a.ldx(_H, R3, FP, _at(_CSUM))
    a.jmp(_JEQ, R3, 0, "csum_ok", src=R2)
    a.jmp(_JNE, R3, 0, "csum_level")
    a.jmp(_JEQ, R2, 0xFFFF, "csum_ok")  # (+0 and -0)
    a.label("csum_level")
    a.movr(R1, R6)
    a.mov(R2, _CSUM_LEVEL_QUERY)
    a.call(FUNC_CSUM_LEVEL)  # the level if CHECKSUM_UNNECESSARY, else an error
    a.jmp(_JSLT, R0, 0, "pass")
    a.label("csum_ok")


def _rewrite(a: _Asm, frame_off: int, new_at: int = _SCRATCH) -> None:
    """Write the word at fp+``new_at`` (as it goes on the wire) over the
    frame's word at ``frame_off`` and patch the TCP checksum for it (the
    frame's old word is still in the copy on the stack)."""
    a.movr(R1, R6)
    a.mov(R2, frame_off)
    a.movr(R3, FP)
    a.op(_ALU64 | _ADD | _K, R3, imm=new_at)
    a.mov(R4, 4)
    a.mov(R5, 0)
    a.call(FUNC_SKB_STORE_BYTES)
    a.jmp(_JNE, R0, 0, "shot")
    a.movr(R1, R6)
    a.mov(R2, _CSUM)
    a.ldx(_W, R3, FP, _at(frame_off))
    a.ldx(_W, R4, FP, new_at)
    a.mov(R5, 4)
    a.call(FUNC_L4_CSUM_REPLACE)
    a.jmp(_JNE, R0, 0, "shot")


def program(limits_fd: int, state_fd: int, on_fd: int, vip: str, mark: int) -> bytes:
    """The tc (direct action) program: TC_ACT_UNSPEC always, the frame
    mapped and marked when it may; TC_ACT_SHOT only if the kernel fails to
    write a frame half mapped (the client resends it, as for a lost clone)."""
    vip_word = struct.unpack("<I", socket.inet_aton(vip))[0]
    a = _Asm()
    a.movr(R6, R1)
    a.ldx(_W, R2, R6, SKB_PKT_TYPE)
    a.jmp(_JNE, R2, PACKET_HOST, "pass")  # (a frame for another host: our stack drops it, the daemon too)
    a.mov(R2, 0)
    a.stx(_W, FP, _SCRATCH, R2)
    _lookup(a, on_fd, _SCRATCH, "pass")  # switched off (takeover)
    a.movr(R1, R6)
    a.mov(R2, 0)
    a.movr(R3, FP)
    a.op(_ALU64 | _ADD | _K, R3, imm=_P)
    a.mov(R4, _FRAME)
    a.call(FUNC_SKB_LOAD_BYTES)  # fails (non-zero) for a shorter frame
    a.jmp(_JNE, R0, 0, "pass")
    a.ldx(_H, R2, FP, _at(12))
    a.jmp(_JNE, R2, 0x0008, "pass")  # EtherType IPv4 (08 00)
    a.ldx(_B, R2, FP, _at(_IP))
    a.jmp(_JNE, R2, 0x45, "pass")  # no IP options
    a.ldx(_H, R2, FP, _at(_IP + 6))
    a.op(_ALU64 | _AND | _K, R2, imm=0xFF3F)
    a.jmp(_JNE, R2, 0, "pass")  # a fragment
    a.ldx(_B, R2, FP, _at(_IP + 9))
    a.jmp(_JNE, R2, 6, "pass")
    a.ldx(_W, R2, FP, _at(_IP + 16))
    a.jmp(_JNE, R2, _s32(vip_word), "pass", cls=_JMP32)
    a.ldx(_B, R2, FP, _at(_TCP + 12))
    a.op(_ALU64 | _RSH | _K, R2, imm=4)
    a.jmp(_JNE, R2, 8, "pass")
    a.ldx(_W, R2, FP, _at(_TCP + 20))
    a.jmp(_JNE, R2, 0x0A080101, "pass", cls=_JMP32)  # NOP NOP TS
    a.ldx(_B, R2, FP, _at(_TCP + 13))
    a.jmp(_JEQ, R2, 0x10, "flags_ok")
    a.jmp(_JNE, R2, 0x18, "pass")  # ACK or ACK|PSH only
    a.label("flags_ok")
    a.ldx(_H, R7, FP, _at(_IP + 2))
    a.be(R7, 16)
    a.op(_ALU64 | _SUB | _K, R7, imm=_HEADERS)  # payload length
    a.jmp(_JSLE, R7, 0, "pass")  # a pure ack: the daemon maps it (see the module doc)
    a.ldx(_W, R2, FP, _at(_TSECR))
    a.jmp(_JEQ, R2, 0, "pass")  # (the daemon leaves an echo of 0 alone)
    _checked_or_unfinished(a)
    a.ldx(_W, R2, FP, _at(_IP + 12))  # key: client address, client port, server port
    a.stx(_W, FP, _KEY_AT, R2)
    a.ldx(_H, R2, FP, _at(_TCP))
    a.stx(_H, FP, _KEY_AT + 4, R2)
    a.ldx(_H, R2, FP, _at(_TCP + 2))
    a.stx(_H, FP, _KEY_AT + 6, R2)
    for fd, dst in ((limits_fd, R8), (state_fd, R9)):
        _lookup(a, fd, _KEY_AT, "pass")
        a.movr(dst, R0)
    a.ldx(_W, R2, FP, _at(_TCP + 4))
    a.be(R2, 32)  # seq
    _sent(a, R8, R9, R1)
    a.jmp(_JNE, R2, 0, "pass", src=R1)  # not next in order
    a.op(_ALU32 | _MOV | _X, R3, R2)
    a.ldx(_W, R4, R8, 20)
    a.op(_ALU32 | _SUB | _X, R3, R4)
    a.jmp(_JSGT, R3, 0, "pass", cls=_JMP32)  # beyond our receive window
    a.op(_ALU32 | _ADD | _X, R2, R7)
    a.stx(_W, FP, _END_AT, R2)
    a.ldx(_W, R3, FP, _at(_TCP + 8))
    a.be(R3, 32)  # the ack
    a.ldx(_W, R4, R9, 12)
    a.jmp(_JEQ, R4, 0, "ack_fresh")
    a.ldx(_W, R4, R9, 16)
    a.op(_ALU32 | _MOV | _X, R5, R3)
    a.op(_ALU32 | _SUB | _X, R5, R4)
    a.jmp(_JSLT, R5, 0, "pass", cls=_JMP32)  # older than one we mapped (reordered)
    a.label("ack_fresh")
    a.op(_ALU32 | _MOV | _X, R4, R3)
    a.ldx(_W, R5, R8, 4)
    a.op(_ALU32 | _SUB | _X, R4, R5)  # how far beyond the core's latest
    a.ldx(_W, R5, R8, 24)
    a.jmp(_JGT, R4, 0, "pass", src=R5, cls=_JMP32)  # older than that, or further than the core trusts
    a.mov(R2, 0)
    a.stx(_W, FP, _CLAMPED_AT, R2)
    a.stx(_W, FP, _WINDOW_WORD_AT, R2)
    a.ldx(_W, R5, R8, 8)
    a.jmp(_JSLE, R4, 0, "unclamped", src=R5, cls=_JMP32)
    # Beyond our output (DESIGN.md trap 9): the ack where our output ends,
    # and the window widened by what the ack lost, so that the right edge
    # stays where the client put it (BackupConn.window_below).
    a.ldx(_W, R3, R8, 4)
    a.op(_ALU32 | _ADD | _X, R3, R5)
    a.op(_ALU32 | _SUB | _X, R4, R5)
    a.ldx(_W, R2, R8, 28)
    a.op(_ALU64 | _RSH | _X, R4, R2)
    a.ldx(_H, R2, FP, _at(_TCP + 14))
    a.be(R2, 16)
    a.op(_ALU64 | _ADD | _X, R4, R2)
    a.jmp(_JGT, R4, 0xFFFF, "window_cut")
    a.jmp(_JA, 0, 0, "window_kept")
    a.label("window_cut")
    a.mov(R4, 0xFFFF)
    a.label("window_kept")
    a.be(R4, 16)
    a.op(_ALU64 | _LSH | _K, R4, imm=16)
    a.ldx(_H, R2, FP, _at(_TCP + 12))  # data offset and flags, as they are
    a.op(_ALU64 | _OR | _X, R4, R2)
    a.stx(_W, FP, _WINDOW_WORD_AT, R4)
    a.mov(R2, 1)
    a.stx(_W, FP, _CLAMPED_AT, R2)
    a.label("unclamped")
    # Map: the ack, the window if widened, then the echo.
    a.ldx(_W, R4, R8, 12)
    a.op(_ALU32 | _SUB | _X, R3, R4)
    a.stx(_W, FP, _SHOWN_AT, R3)
    a.be(R3, 32)
    a.stx(_W, FP, _SCRATCH, R3)
    _rewrite(a, _TCP + 8)
    a.ldx(_W, R2, FP, _CLAMPED_AT)
    a.jmp(_JEQ, R2, 0, "window_as_is")
    _rewrite(a, _TCP + 12, _WINDOW_WORD_AT)
    a.label("window_as_is")
    a.ldx(_W, R2, FP, _at(_TSECR))
    a.be(R2, 32)
    a.ldx(_W, R3, R8, 16)
    a.op(_ALU32 | _SUB | _X, R2, R3)
    a.be(R2, 32)
    a.stx(_W, FP, _SCRATCH, R2)
    _rewrite(a, _TSECR)
    # What the daemon reads back.
    a.ldx(_W, R2, FP, _END_AT)
    a.stx(_W, R9, 0, R2)
    _max_into(a, 4, "tsval", _TSVAL)
    _max_into(a, 8, "tsecr", _TSECR)

    def window() -> None:
        a.ldx(_H, R2, FP, _at(_TCP + 14))
        a.be(R2, 16)
        a.stx(_W, R9, 20, R2)

    # The ack and the window beside it (a later segment with the same ack
    # may carry a new window), and the highest ack shown to our stack.
    _max_into(a, 16, "ack", _TCP + 8, equal_too=True, also=window)
    a.ldx(_W, R2, FP, _SHOWN_AT)
    _max_into(a, 24, "shown")
    a.mov(R2, 1)
    a.stx(_W, R9, 12, R2)
    a.ldx(_DW, R2, R9, 32)
    a.op(_ALU64 | _ADD | _K, R2, imm=1)
    a.stx(_DW, R9, 32, R2)
    a.ldx(_DW, R2, R9, 40)
    a.op(_ALU64 | _ADD | _X, R2, R7)
    a.stx(_DW, R9, 40, R2)
    a.mov(R2, _s32(mark))
    a.stx(_W, R6, SKB_MARK, R2)  # the queue rule skips it
    a.label("pass")
    a.mov(R0, TC_ACT_UNSPEC)
    a.exit()
    a.label("shot")
    a.mov(R0, TC_ACT_SHOT)
    a.exit()
    return a.assemble()
