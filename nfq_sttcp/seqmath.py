"""Modulo-2^32 arithmetic for TCP sequence numbers and timestamps.

Both spaces wrap, so every comparison goes through the signed difference
(RFC 1982 serial arithmetic), never through plain ``<``.
"""

MOD = 1 << 32
MASK = MOD - 1
HALF = 1 << 31


def seq_add(a: int, b: int) -> int:
    return (a + b) & MASK


def seq_sub(a: int, b: int) -> int:
    """a - b in sequence space (the result is itself a sequence number)."""
    return (a - b) & MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance from b to a, in (-2^31, 2^31]."""
    d = (a - b) & MASK
    return d - MOD if d > HALF else d


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_diff(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    return seq_diff(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    return seq_diff(a, b) >= 0


def seq_max(a: int, b: int) -> int:
    return a if seq_ge(a, b) else b


def seq_min(a: int, b: int) -> int:
    return a if seq_le(a, b) else b
