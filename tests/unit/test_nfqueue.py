"""The nfnetlink_queue messages we send and read ourselves (nfqueue.py)."""

import struct

import pytest
from hypothesis import given, strategies as st

from nfq_sttcp import nfqueue


def _attrs(body):
    out, off = {}, 0
    while off < len(body):
        n, kind = struct.unpack_from("=HH", body, off)
        out[kind] = body[off + 4:off + n]
        off += (n + 3) & ~3
    return out


def test_config_message_asks_for_whole_packets_and_gso_with_an_ack():
    m = nfqueue.config_message(13, seq=77)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", m)
    assert (length, kind, seq, pid) == (len(m), (3 << 8) | 2, 77, 0)
    assert flags == nfqueue.NLM_F_REQUEST | nfqueue.NLM_F_ACK
    family, version, res_id = struct.unpack_from("=BBH", m, 16)
    assert (family, version, struct.unpack("!H", struct.pack("=H", res_id))[0]) == (0, 0, 13)
    a = _attrs(m[20:])
    assert struct.unpack("!IB", a[nfqueue.NFQA_CFG_PARAMS]) == (65531, nfqueue.NFQNL_COPY_PACKET)
    assert struct.unpack("!I", a[nfqueue.NFQA_CFG_MASK])[0] == nfqueue.NFQA_CFG_F_GSO
    assert struct.unpack("!I", a[nfqueue.NFQA_CFG_FLAGS])[0] == nfqueue.NFQA_CFG_F_GSO
    off = _attrs(nfqueue.config_message(13, 1, gso=False)[20:])
    assert struct.unpack("!I", off[nfqueue.NFQA_CFG_FLAGS])[0] == 0


def _error(seq, errno_):
    return struct.pack("=IHHII", 36, nfqueue.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -errno_) + b"\0" * 16


def test_ack_error_finds_the_answer_to_our_message_only():
    assert nfqueue.ack_error(_error(5, 0), 5) == 0
    assert nfqueue.ack_error(_error(5, 95), 5) == 95
    assert nfqueue.ack_error(_error(4, 0), 5) is None  # someone else's
    other = struct.pack("=IHHII", 20, (3 << 8) | 0, 0, 0, 0) + b"\0" * 4  # a queued packet before it
    assert nfqueue.ack_error(other + _error(5, 0), 5) == 0
    assert nfqueue.ack_error(b"", 5) is None
    assert nfqueue.ack_error(b"\0" * 16, 5) is None  # a zero length never loops


def test_queue_drops_reads_our_queues_from_the_kernels_statistics():
    text = ("   11  10410     0 2 65531     0     0    57881  1\n"
            "   12  10416     3 2 65531    17     4    84972  1\n"
            "   13 3569630324     0 2 65531 4294967295     9    57435  1\n"
            "garbage line\n"
            "   14  1 2\n")
    assert nfqueue.queue_drops(text, [12, 13]) == {12: (17, 4), 13: (4294967295, 9)}
    assert nfqueue.queue_drops(text, [99]) == {}
    assert nfqueue.queue_drops("", [12]) == {}


def _packet_message(attrs):
    """A queued-packet message as the kernel builds it: netlink header,
    nfgenmsg, then attributes (type, value), each padded to 4 bytes."""
    body = struct.pack("=BBH", 2, 0, 0)
    for kind, value in attrs:
        n = 4 + len(value)
        body += struct.pack("=HH", n, kind) + value + b"\0" * (-n % 4)
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body


@pytest.mark.parametrize("skb_info", [nfqueue.skb_info, nfqueue._skb_info_py], ids=["c", "pure"])
def test_skb_info_reads_the_kernels_word_on_the_checksum(skb_info):
    hdr = (1, struct.pack("!IHB", 7, 0x0800, 0) + b"\0")
    payload = (nfqueue.NFQA_PAYLOAD, b"E" + b"\0" * 39)
    info = lambda flags: (nfqueue.NFQA_SKB_INFO, struct.pack("!I", flags))
    assert skb_info(_packet_message([hdr, (3, b"\0\0\0\1"), info(0x3), payload])) == 0x3
    assert skb_info(_packet_message([hdr, info(nfqueue.NFQA_SKB_CSUM_NOTVERIFIED), payload])) == 0x4
    # left out: a packet the kernel (or a NIC) has checked, not GSO
    assert skb_info(_packet_message([hdr, payload])) == 0
    # an attribute after the payload is not looked for
    assert skb_info(_packet_message([hdr, payload, info(0x4)])) == 0
    # what it cannot read is None: the core then judges from the checksum field
    assert skb_info(b"\0" * 10) is None
    broken = bytearray(_packet_message([hdr, payload]))
    broken[20:22] = b"\x02\x00"  # an attribute shorter than its header
    assert skb_info(bytes(broken)) is None
    assert skb_info(_packet_message([hdr, info(0x1)])[:-2]) is None  # cut inside the flags


@given(st.binary(max_size=200))
def test_skb_info_in_c_agrees_with_the_pure_version_on_any_bytes(data):
    msg = struct.pack("=I", len(data) + 20) + bytes(16) + data
    for m in (data, msg, msg[:-1]):
        assert nfqueue.skb_info(m) == nfqueue._skb_info_py(m)


def _newlink(seq, attrs, kind=nfqueue.RTM_NEWLINK):
    body = struct.pack("=BxHiII", 0, 1, 7, 0, 0)
    for t, v in attrs:
        body += struct.pack("=HH", 4 + len(v), t) + v + b"\0" * (-len(v) % 4)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def test_getlink_asks_for_one_link_by_index():
    msg = nfqueue.getlink_request(7, 42)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq) == (len(msg), nfqueue.RTM_GETLINK, nfqueue.NLM_F_REQUEST, 42)
    assert struct.unpack_from("=i", msg, 20)[0] == 7


def test_parse_link_sizes_reads_the_big_tcp_sizes_of_the_answer_to_our_request():
    name = (3, b"lan0\0")
    answer = _newlink(5, [name, (nfqueue.IFLA_GSO_IPV4_MAX_SIZE, struct.pack("=I", 196608)),
                          (41, struct.pack("=I", 65536)),  # IFLA_GSO_MAX_SIZE: IPv6's, not ours
                          (nfqueue.IFLA_GRO_IPV4_MAX_SIZE, struct.pack("=I", 65536))])
    assert nfqueue.parse_link_sizes(answer, 5) == {"gso_ipv4_max_size": 196608, "gro_ipv4_max_size": 65536}
    assert nfqueue.parse_link_sizes(answer, 6) is None  # not the answer to this request
    assert nfqueue.parse_link_sizes(answer[:40], 5) is None  # cut short
    assert nfqueue.parse_link_sizes(_newlink(5, [name]), 5) == {}  # a kernel before 6.3
    # another message first (an answer to an older request), then ours
    assert nfqueue.parse_link_sizes(_newlink(4, [(nfqueue.IFLA_GSO_IPV4_MAX_SIZE, struct.pack("=I", 1))]) + answer,
                                     5) == {"gso_ipv4_max_size": 196608, "gro_ipv4_max_size": 65536}
    err = struct.pack("=IHHII", 36, nfqueue.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", -19) + b"\0" * 16
    with pytest.raises(OSError) as e:
        nfqueue.parse_link_sizes(err, 5)
    assert e.value.errno == 19
    ack = struct.pack("=IHHII", 36, nfqueue.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", 0) + b"\0" * 16
    assert nfqueue.parse_link_sizes(ack, 5) is None  # an acknowledgement, no link: not the answer
    probs = nfqueue.oversize_problems({"lan0": {"gso_ipv4_max_size": 196608, "gro_ipv4_max_size": 65536},
                                       "eth1": {"gso_ipv4_max_size": 65536, "gro_ipv4_max_size": 65536},
                                       "sync0": None, "old0": {}})
    assert [(i, p is None) for i, p in probs] == [("lan0", False), ("sync0", True)]
    assert "lan0 has gso_ipv4_max_size 196608: BIG TCP" in probs[0][1]


def test_the_daemons_recheck_reports_each_link_once_per_change():
    ok, big = {"gso_ipv4_max_size": 65536, "gro_ipv4_max_size": 65536}, {"gso_ipv4_max_size": 196608}
    start = nfqueue.size_states({"lan0": ok, "sync0": ok, "old0": {}})
    assert start == {"lan0": "ok", "sync0": "ok", "old0": "ok"}  # (a kernel before 6.3 sends neither size)
    raised = nfqueue.size_states({"lan0": big, "sync0": ok, "old0": {}})
    assert raised["lan0"].startswith("lan0 has gso_ipv4_max_size 196608: BIG TCP")
    changes = nfqueue.size_changes(start, raised)
    assert changes == [("packet_sizes_raised", "lan0", raised["lan0"])]
    assert nfqueue.size_changes(raised, raised) == [], "still raised: said once, not at every recheck"
    gone = nfqueue.size_states({"lan0": ok, "sync0": None, "old0": {}})
    assert nfqueue.size_changes(raised, gone) == [("packet_sizes_restored", "lan0", ""),
                                                  ("packet_sizes_unknown", "sync0", "")]
    assert nfqueue.size_changes(gone, start) == [("packet_sizes_restored", "sync0", "")]  # readable and fine again
    # a raised link that cannot be read once stays raised: not cleared, not reported twice
    unread = nfqueue.size_carry(raised, nfqueue.size_states({"lan0": None, "sync0": ok, "old0": {}}))
    assert unread == raised and nfqueue.size_changes(raised, unread) == []
    assert nfqueue.size_carry(start, gone) == gone, "a fine link unread is unknown"
    bigger = nfqueue.size_states({"lan0": {"gso_ipv4_max_size": 262144}, "sync0": ok, "old0": {}})
    assert nfqueue.size_changes(raised, bigger)[0][0] == "packet_sizes_raised", "raised further: said again"
    # a new listing without a link: it left, and its raised state with it
    left = {"lan0": "ok", "old0": "ok"}
    assert nfqueue.size_changes(raised, left) == [("packet_sizes_link_gone", "sync0", ""),
                                                  ("packet_sizes_restored", "lan0", "")]


def test_the_links_are_listed_again_when_one_cannot_be_read_or_the_listing_is_a_minute_old():
    fine = {"lan0": "ok", "sync0": "ok"}
    assert not nfqueue.relist_due(fine, listed_at=100.0, now=100.0 + nfqueue.SIZES_RELIST_S - 1)
    assert nfqueue.relist_due(fine, listed_at=100.0, now=100.0 + nfqueue.SIZES_RELIST_S)
    assert nfqueue.relist_due({"lan0": "ok", "sync0": nfqueue.SIZES_UNKNOWN}, listed_at=100.0, now=100.0)
    raised = nfqueue.size_states({"lan0": {"gso_ipv4_max_size": 196608}})
    assert not nfqueue.relist_due(raised, listed_at=100.0, now=101.0), "read and raised: the listing stands"


def test_links_beneath_follow_a_vlan_to_its_parent_and_a_bridge_or_bond_to_its_ports():
    links = [(1, "lo", None, None), (2, "eth0", None, 5), (3, "eth1", None, 5), (5, "bond0", None, None),
             (6, "bond0.7", 5, 8), (8, "br0", None, None), (9, "veth1", 10, 8), (10, "veth1p", 9, None),
             (11, "sync0", None, None)]
    assert nfqueue.links_beneath(links, "br0") == ["br0", "bond0.7", "veth1", "bond0", "veth1p", "eth0", "eth1"]
    assert nfqueue.links_beneath(links, "sync0") == ["sync0"]
    assert nfqueue.links_beneath(links, "bond0") == ["bond0", "eth0", "eth1"]
    assert nfqueue.links_beneath(links, "nosuch") == []
