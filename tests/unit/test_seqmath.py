from hypothesis import given, strategies as st

from nfq_sttcp.seqmath import MOD, seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt, seq_max, seq_min, seq_sub

u32 = st.integers(0, MOD - 1)
step = st.integers(1, (1 << 31) - 1)


def test_wraparound_near_2_32():
    top = MOD - 10
    assert seq_add(top, 20) == 10
    assert seq_lt(top, 10) and seq_gt(10, top)
    assert seq_diff(10, top) == 20 and seq_diff(top, 10) == -20
    assert seq_sub(5, 10) == MOD - 5
    assert seq_max(top, 10) == 10 and seq_min(top, 10) == top


@given(u32, step)
def test_adding_moves_forward(a, d):
    b = seq_add(a, d)
    assert seq_gt(b, a) and seq_lt(a, b)
    assert seq_diff(b, a) == d
    assert seq_sub(b, d) == a


@given(u32, u32)
def test_order_is_antisymmetric(a, b):
    if a != b and seq_diff(a, b) != 1 << 31:
        assert seq_lt(a, b) != seq_lt(b, a)
    assert seq_le(a, a) and seq_ge(a, a)
