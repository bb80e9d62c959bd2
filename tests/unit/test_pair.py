"""One client stream through a primary model and a backup model (as h11's
ConnectionPair): after every step and after failover they must agree."""

import pytest

from nfq_sttcp import tcpseg
from nfq_sttcp.actions import Accept, Defer, Drop, Inject, Release, SendSync
from nfq_sttcp.backup import BackupConfig, BackupCore
from nfq_sttcp.primary import PrimaryConfig, PrimaryCore
from nfq_sttcp.seqmath import MOD, seq_add
from nfq_sttcp.syncproto import ConnIsn

from .helpers import KEY, VIP, client_syn, from_client, from_server, server_synack

PORTS = frozenset({7000})


class Pair:
    def __init__(self, isn_c, isn_p, isn_b, ts_p, ts_b, max_lag=0):
        self.p = PrimaryCore(PrimaryConfig(VIP, PORTS, max_lag=max_lag))
        self.p.backup_following = True
        self.b = BackupCore(BackupConfig(VIP, PORTS))
        self.isn_c, self.isn_p, self.isn_b, self.ts_p, self.ts_b = isn_c, isn_p, isn_b, ts_p, ts_b
        self.to_backup = []  # sync messages in flight primary -> backup
        self.to_primary = []
        self.client_got = []  # what reached the client (bytes)

    def sync(self, acts, queue):
        for a in acts:
            if isinstance(a, SendSync):
                queue.append(a.message)

    def deliver(self, now=0.0):
        while self.to_backup or self.to_primary:
            for m in self.to_backup:
                acts = self.b.on_conn_isn(m, now) if isinstance(m, ConnIsn) else []
                self.sync(acts, self.to_primary)
                self.backup_injects = [a.packet for a in acts if isinstance(a, Inject)]
            self.to_backup = []
            self.backup_batch(now)
            for m in self.to_primary:
                acts = self.p.on_confirm(m, now)
                self.client_got += [a.packet for a in acts if isinstance(a, Inject)]
                self.released = [a for a in acts if isinstance(a, Release)]
            self.to_primary = []

    def backup_batch(self, now=0.0):
        self.sync(self.b.on_batch_end(now), self.to_primary)


def verdict(acts):
    v = [a for a in acts if isinstance(a, (Accept, Drop, Defer))]
    assert len(v) == 1, acts
    return v[0]


@pytest.mark.parametrize("isn_c,isn_p,isn_b", [
    (1000, 50000, 900000),
    (MOD - 5, MOD - 3, 7),       # every space wraps during the exchange
    (17, 3, MOD - 40),
])
def test_pair_agrees_through_handshake_data_and_failover(isn_c, isn_p, isn_b):
    ts_p, ts_b = MOD - 100, 12345
    pr = Pair(isn_c, isn_p, isn_b, ts_p, ts_b)
    # client SYN reaches the backup (clone)
    assert isinstance(verdict(pr.b.on_inbound(client_syn(isn_c), 0)), Accept)
    # primary SYN-ACK: held until the backup has the SYN; ISN goes to the backup
    acts = pr.p.on_outbound(server_synack(isn_p, isn_c, ts_p), 0)
    assert isinstance(verdict(acts), Drop)
    pr.sync(acts, pr.to_backup)
    # backup SYN-ACK: held, confirmation of client ISN+1
    assert isinstance(verdict(pr.b.on_outbound(server_synack(isn_b, isn_c, ts_b), 0)), Drop)
    pr.backup_batch()
    pr.deliver()
    conn = pr.b.conns[KEY]
    assert conn.protected and conn.delta_seq == (isn_p - isn_b) % MOD and conn.delta_ts == (ts_p - ts_b) % MOD
    # the primary released its SYN-ACK exactly once the backup confirmed
    assert len(pr.client_got) == 1 and tcpseg.parse(pr.client_got[0]).seq == isn_p

    # handshake ACK from the client, in the primary's space, mapped exactly (trap 14)
    c1 = seq_add(isn_c, 1)
    acts = pr.b.on_inbound(from_client(c1, seq_add(isn_p, 1), tsval=1001, tsecr=ts_p), 0.01)
    seg = tcpseg.parse(verdict(acts).payload)
    assert seg.ack == seq_add(isn_b, 1) and seg.tsecr == ts_b

    # client sends 100 bytes; both stacks ack them; the primary's ack is clamped until confirmed
    pr.b.on_inbound(from_client(c1, seq_add(isn_p, 1), payload=b"q" * 100, tsecr=ts_p), 0.02)
    c101 = seq_add(c1, 100)
    reply_p = from_server(seq_add(isn_p, 1), c101, payload=b"r" * 100, tsval=ts_p + 5)
    acts = pr.p.on_outbound(reply_p, 0.02)
    shown = tcpseg.parse(verdict(acts).payload)
    assert shown.ack == c1, "the client must not see an ack the backup has not confirmed"
    reply_b = from_server(seq_add(isn_b, 1), c101, payload=b"r" * 100, tsval=ts_b + 5)
    assert isinstance(verdict(pr.b.on_outbound(reply_b, 0.02)), Drop)
    pr.backup_batch()
    pr.deliver()
    released = tcpseg.parse(pr.client_got[-1])
    assert released.ack == c101 and released.payload_len == 0

    # the primary crashes; the client has not acked the reply: the backup resends it, mapped
    acts = pr.b.activate(1.0)
    resent = [tcpseg.parse(a.packet) for a in acts if isinstance(a, Inject) and a.why == "held segment resent"]
    assert [s.seq for s in resent] == [seq_add(isn_p, 1)]
    assert resent[0].ack == c101
    assert resent[0].tsval != ts_b + 5  # a fresh timestamp (trap 16) ...
    assert (resent[0].tsval - (ts_p + 5)) % MOD < 1 << 31  # ... never behind the primary's
    prompts = [tcpseg.parse(a.packet) for a in acts if isinstance(a, Inject) and a.why == "takeover prompt"]
    assert prompts and all(p.ack == c101 and p.seq == seq_add(isn_p, 101) for p in prompts)
    # A connection idle for longer than that gets no prompt: nothing of the client's waits for our ack.
    pr.b.active = False
    acts = pr.b.activate(1.0 + 2.5)
    assert not [a for a in acts if isinstance(a, Inject) and a.why == "takeover prompt"]
    pr.b.active = True

    # after failover the backup's new output is in the primary's space
    acts = pr.b.on_outbound(from_server(seq_add(isn_b, 101), c101, payload=b"s" * 10, tsval=ts_b + 1000), 1.0)
    out = tcpseg.parse(verdict(acts).payload)
    assert out.seq == seq_add(isn_p, 101) and out.tsval == (ts_b + 1000 + ts_p - ts_b) % MOD
    # and the client's acks keep being mapped into the backup's space
    acts = pr.b.on_inbound(from_client(c101, seq_add(isn_p, 111), tsecr=out.tsval), 1.01)
    back = tcpseg.parse(verdict(acts).payload)
    assert back.ack == seq_add(isn_b, 111) and back.tsecr == ts_b + 1000


def test_backup_behind_is_ack_clocked_by_its_own_output():
    """Trap 9: client acks beyond what the backup sent are clamped, and bytes the
    client already has are dropped and self-acked instead of held."""
    pr = Pair(1000, 50000, 90000, 500, 100)
    pr.b.on_inbound(client_syn(1000), 0)
    pr.sync(pr.p.on_outbound(server_synack(50000, 1000, 500), 0), pr.to_backup)
    pr.b.on_outbound(server_synack(90000, 1000, 100), 0)
    pr.backup_batch()
    pr.deliver()
    # the client has acked 3000 bytes of the primary's output; the backup sent none yet
    acts = pr.b.on_inbound(from_client(1001, 50001 + 3000, tsecr=500), 0.1)
    assert tcpseg.parse(verdict(acts).payload).ack == 90001
    # now the backup emits 1000 bytes the client already has
    acts = pr.b.on_outbound(from_server(90001, 1001, payload=b"x" * 1000, tsval=120), 0.1)
    assert isinstance(verdict(acts), Drop)
    assert not pr.b.conns[KEY].held
    injected = [a for a in pr.b.on_batch_end(0.1) if isinstance(a, Inject)]
    assert len(injected) == 1
    ack = tcpseg.parse(injected[0].packet)
    assert (ack.src, ack.dst, ack.ack) == ("10.77.0.10", VIP, 91001)


def test_lag_bound_defers_primary_output_until_the_backup_catches_up():
    pr = Pair(1000, 50000, 90000, 500, 100, max_lag=2000)
    pr.b.on_inbound(client_syn(1000), 0)
    pr.sync(pr.p.on_outbound(server_synack(50000, 1000, 500), 0), pr.to_backup)
    pr.b.on_outbound(server_synack(90000, 1000, 100), 0)
    pr.backup_batch()
    pr.deliver()
    segs = [from_server(50001 + i * 1000, 1001, payload=b"d" * 1000) for i in range(5)]
    verdicts = [verdict(pr.p.on_outbound(s, 0.1)) for s in segs]
    assert [type(v).__name__ for v in verdicts] == ["Accept", "Accept", "Defer", "Defer", "Defer"]
    # the backup produces 2000 bytes; the primary may now run 2000 beyond that
    pr.b.on_outbound(from_server(90001, 1001, payload=b"d" * 2000), 0.2)
    pr.backup_batch()
    pr.deliver()
    assert [r.token for r in pr.released] == [verdicts[2].token, verdicts[3].token]
