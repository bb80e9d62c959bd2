"""The test server's deterministic stream (what every download is checked against)."""

from array import array

import pytest

from nfq_sttcp.testapp import stream_block, stream_bytes


def reference_block(seed: int, block: int) -> bytes:
    """The definition: word i of a block holds base + i, in native byte order."""
    base = ((seed & 0xFFFF) << 48) | (block * 8192)
    return array("Q", range(base, base + 8192)).tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2, 0xFFFF, 0x12345])
@pytest.mark.parametrize("block", [0, 1, 7, 12345, (1 << 35) - 1])
def test_block_matches_its_definition(seed: int, block: int) -> None:
    assert stream_block(seed, block) == reference_block(seed, block)


def test_bytes_cross_block_edges() -> None:
    whole = reference_block(3, 0) + reference_block(3, 1) + reference_block(3, 2)
    for off, n in [(0, 10), (65530, 20), (1, 131072), (131071, 65537), (0, 0)]:
        assert stream_bytes(3, off, n) == whole[off:off + n]
