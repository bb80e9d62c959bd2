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


def test_repeated_answers_come_from_the_cache_unchanged() -> None:
    """A request-response server asks for the same first bytes every time:
    the block is built once, and what the cache returns is still the stream
    after other blocks pass through it."""
    stream_block.cache_clear()
    first = stream_bytes(7, 0, 16384)
    for block in range(8):  # more blocks than the cache holds
        assert stream_block(9, block) == reference_block(9, block)
    for _ in range(3):
        assert stream_bytes(7, 0, 16384) == first == reference_block(7, 0)[:16384]
    assert stream_bytes(7, 0, 1) == reference_block(7, 0)[:1]
    assert stream_block.cache_info().hits >= 3  # built again once after being pushed out, then cached


def test_bytes_cross_block_edges() -> None:
    whole = reference_block(3, 0) + reference_block(3, 1) + reference_block(3, 2)
    for off, n in [(0, 10), (65530, 20), (1, 131072), (131071, 65537), (0, 0)]:
        assert stream_bytes(3, off, n) == whole[off:off + n]


@pytest.mark.parametrize("request_line, paced", [(b"300000 3 pace=8000\n", True), (b"300000 3\n", False)])
def test_bulk_source_sends_the_stream_and_paces_it_when_asked(request_line: bytes, paced: bool) -> None:
    """``pace=KBPS`` spreads the same bytes over time: 300,000 bytes at
    8,000 kbit/s cannot take less than 0.3 s (a lower bound: what pacing
    means, not a speed check)."""
    import socket
    import threading
    import time

    from nfq_sttcp.testapp import Server

    ours, theirs = socket.socketpair()
    t = threading.Thread(target=Server("127.0.0.1", 0.0).serve_bulk, args=(theirs,), daemon=True)
    t0 = time.monotonic()
    t.start()
    ours.sendall(request_line)
    got = bytearray()
    while True:
        d = ours.recv(65536)
        if not d:
            break
        got += d
    took = time.monotonic() - t0
    ours.close()
    t.join(5)
    assert bytes(got) == stream_bytes(3, 0, 300000)
    if paced:
        assert took >= 0.29


@pytest.mark.parametrize("sent, expect", [(300000, b"300000\n"), (1000, b"1000\n")])
def test_bulk_port_discards_an_upload_and_counts_it(sent: int, expect: bytes) -> None:
    """``LENGTH SEED discard``: the benchmark's upload. The server reads what
    was announced and answers the count; a client that stops short gets the
    count of what came (1000 of 300,000 announced), not a hang."""
    import socket
    import threading

    from nfq_sttcp.testapp import Server
    from nfq_sttcp.traffic import recv_line

    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    t = threading.Thread(target=Server("127.0.0.1", 0.0).serve_bulk, args=(theirs,), daemon=True)
    t.start()
    ours.sendall(b"300000 0 discard\n" + bytes(range(256)) * (sent // 256) + bytes(sent % 256))
    if sent < 300000:
        ours.shutdown(socket.SHUT_WR)
    answer = recv_line(ours, 100)
    assert answer == expect
    if sent == 300000:
        ours.shutdown(socket.SHUT_WR)  # the server closes after the client
    assert ours.recv(1) == b""
    ours.close()
    t.join(5)
    assert not t.is_alive()


def test_bulk_port_closes_on_a_mode_it_does_not_know() -> None:
    """A client asking for a mode this server lacks (an older copy without
    ``discard``, a typo) is told at once by the close, rather than being
    sent a download while it sends too."""
    import socket
    import threading

    from nfq_sttcp.testapp import Server

    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    t = threading.Thread(target=Server("127.0.0.1", 0.0).serve_bulk, args=(theirs,), daemon=True)
    t.start()
    ours.sendall(b"1000 0 upload\n")
    t.join(5)
    assert not t.is_alive()
    theirs.close()  # (the server's handler loop closes it; here the test stands in for it)
    assert ours.recv(100) == b""
