import pytest
from hypothesis import given, settings, strategies as st

from nfq_sttcp import syncproto
from nfq_sttcp.syncproto import (Confirm, ConfirmEntry, ConnIsn, Digest, DigestEntry, Diverged, Heartbeat, ReplayGuard,
                                 SyncError, Unprotect)

KEY = b"k" * 32
CK = ("10.77.0.10", 40000, "10.77.0.100", 7000)
MESSAGES = [
    Heartbeat("primary", "serving", 123456789),
    Heartbeat("backup", "following", 0),
    Heartbeat("backup", "following", 5, 2, 123456789012, 40000),
    ConnIsn(CK, 2**32 - 1, 77, True, 1460, 7, True),
    ConnIsn(CK, 0, 0, False, 0, -1, False),
    ConnIsn(CK, 1, 2, True, 1460, 7, True, 3, digests=False),
    ConnIsn(CK, 1, 2, False, 536, -1, False, digests=False),
    Confirm((ConfirmEntry(CK, 5), ConfirmEntry(("1.2.3.4", 1, "5.6.7.8", 2), 2**32 - 1, 12, ((1, 2), (2**32 - 1, 9)), 77, 2**32 - 2))),
    Digest((DigestEntry(CK, 2**32 - 1, 1448, b"\x01" * 4), DigestEntry(CK, 0, 1, b"abcd"))),
    Digest(tuple(DigestEntry(CK, i, 100, b"1234") for i in range(syncproto.MAX_DIGESTS))),
    Diverged(CK, 2**40),
    Unprotect((CK,)),
    Unprotect(tuple(("10.0.%d.%d" % (i // 250, i % 250), i, "10.77.0.100", 7000) for i in range(syncproto.MAX_UNPROTECT))),
]


@pytest.mark.parametrize("msg", MESSAGES)
@pytest.mark.parametrize("key", [None, KEY])
def test_round_trip(msg, key):
    data = syncproto.encode(msg, 7, 42, key)
    assert syncproto.decode(data, key) == (7, 42, msg)


def test_forged_or_altered_messages_are_rejected():
    data = syncproto.encode(MESSAGES[0], 1, 1, KEY)
    with pytest.raises(SyncError, match="MAC"):
        syncproto.decode(data, b"x" * 32)
    tampered = bytearray(data)
    tampered[10] ^= 1
    with pytest.raises(SyncError, match="MAC"):
        syncproto.decode(bytes(tampered), KEY)
    with pytest.raises(SyncError, match="MAC"):
        syncproto.decode(syncproto.encode(MESSAGES[0], 1, 1, None) + b"\0" * 32, KEY)


def test_the_mac_is_hmac_sha256_of_the_message_under_each_key():
    import hashlib
    import hmac
    for key in (KEY, b"y" * 32, KEY):  # (the keyed state is cached per key)
        data = syncproto.encode(MESSAGES[1], 3, 9, key)
        assert data[-32:] == hmac.new(key, data[:-32], hashlib.sha256).digest()


def test_bad_sizes_versions_and_types():
    good = syncproto.encode(MESSAGES[2], 1, 1, None)
    with pytest.raises(SyncError, match="wrong size"):
        syncproto.decode(good[:-1], None)
    with pytest.raises(SyncError, match="version"):
        syncproto.decode(good[:2] + b"\x09" + good[3:], None)
    with pytest.raises(SyncError, match="unknown message type"):
        syncproto.decode(good[:3] + b"\x63" + good[4:], None)
    isn = bytearray(syncproto.encode(MESSAGES[3], 1, 1, None))
    isn[20 + 12 + 8] = 4  # the flags byte: a bit no version defines
    with pytest.raises(SyncError, match="unknown flags"):
        syncproto.decode(bytes(isn), None)
    with pytest.raises(SyncError, match="exceeds"):
        syncproto.decode(b"S" * 5000, None)
    with pytest.raises(SyncError):
        syncproto.encode(Confirm(tuple(ConfirmEntry(CK, i) for i in range(syncproto.MAX_CONFIRMS + 1))), 1, 1, None)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1500), st.sampled_from([None, KEY]))
def test_fuzzed_datagrams_only_ever_raise_sync_error(data, key):
    try:
        syncproto.decode(data, key)
    except SyncError:
        pass


def test_replay_guard_window():
    g = ReplayGuard()
    assert g.accept(5, 10)
    assert not g.accept(5, 10), "the same message twice"
    assert g.accept(5, 12)
    assert g.accept(5, 11), "out of order within the window is fine"
    assert not g.accept(5, 11)
    assert g.accept(5, 12 + ReplayGuard.WINDOW + 5)
    assert not g.accept(5, 12), "older than the window"
    assert g.accept(6, 1), "a restarted peer starts a new epoch"
    assert not g.accept(5, 99999), "a message from an earlier life of the peer is a replay"


def test_every_state_a_heartbeat_can_carry_encodes():
    from nfq_sttcp import watchdog
    for state in set(watchdog.TRANSITIONS) | {watchdog.SERVING, watchdog.STOPPING}:
        msg = Heartbeat("backup", state, 1)
        assert syncproto.decode(syncproto.encode(msg, 1, 1, KEY), KEY)[2] == msg


def test_an_epoch_is_the_clock_unless_the_clock_reads_behind_the_last_life() -> None:
    from nfq_sttcp.syncproto import next_epoch

    assert next_epoch(1_000, None) == 1_000
    assert next_epoch(1_000, 999) == 1_000
    assert next_epoch(1_000, 1_000) == 1_001  # the same reading twice: still a new life
    assert next_epoch(1_000, 5_000) == 5_001  # stepped back across the restart
