import os

import pytest

from nfq_sttcp import config
from nfq_sttcp.config import ConfigError

BASE = {"vip": "10.77.0.100", "ports": [7000, 7001], "lan_interface": "lan0",
        "sync": {"primary": "10.78.0.1", "backup": "10.78.0.2"}}


def cfg(**over):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for k, v in over.items():
        if "." in k:
            sec, key = k.split(".")
            d.setdefault(sec, {})[key] = v
        elif v is None:
            d.pop(k)
        else:
            d[k] = v
    return config.from_dict(d)


def test_defaults_and_derived_values():
    c = cfg()
    assert c.heartbeat_interval_ms == 50 and c.heartbeat_missed == 3 and c.detection_ms == 150
    assert c.max_backup_lag_kb == 256 and c.max_backup_lag_ms == 25
    # a backup checks client acks against the bound its primary may grant
    assert c.client_ack_ahead == config.MAX_PACED_LAG + (4 << 20)
    assert cfg(**{"tuning.max_backup_lag_ms": 0}).client_ack_ahead == (256 << 10) + (4 << 20)
    assert cfg(**{"tuning.max_backup_lag_kb": 0}).client_ack_ahead == 1 << 30, "no bound: none of ours either"
    assert c.peer_addresses("primary") == ["10.78.0.2"]
    c = cfg(**{"lan.primary": "10.77.0.1", "lan.backup": "10.77.0.2"})
    assert c.peer_addresses("backup") == ["10.78.0.1", "10.77.0.1"]


@pytest.mark.parametrize("over,msg", [
    ({"vip": None}, "missing required key.*vip"),
    ({"vip": "10.77.0.300"}, "not an IPv4 address"),
    ({"ports": []}, "at least one"),
    ({"ports": [7000, 7000]}, "distinct"),
    ({"ports": [0]}, "1..65535"),
    ({"ports": "7000"}, "list of integers"),
    ({"lan_interface": "this-name-is-far-too-long"}, "not a valid interface"),
    ({"sync.backup": "10.78.0.1"}, "must differ"),
    ({"vip": "10.78.0.1"}, "must not be a host address"),
    ({"heartbeat.interval_ms": 0}, "interval_ms"),
    ({"heartbeat.missed": "3"}, "must be an integer"),
    ({"heartbeat.daemon_lost_ms": 10}, "daemon_lost_ms must be in interval_ms"),
    ({"metrics_port": 70000}, "metrics_port must be in 0..65535"),
    ({"metrics_address": "localhost"}, "not an IP address"),
    ({"queues.backup_in": 11}, "distinct"),
    ({"lan.primary": "10.77.0.1"}, "both lan.primary and lan.backup"),
    ({"lan.primary": "192.168.1.1", "lan.backup": "10.77.0.2"}, "outside the VIP's LAN subnet"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"heartbeat.intervall_ms": 5}, "unknown key heartbeat.intervall_ms"),
    ({"lan_snoop": "yes"}, "true or false"),
    ({"sync.key_file": "/nonexistent/key"}, "cannot read"),
    ({"tuning.max_backup_lag_ms": -1}, "max_backup_lag_ms must be in 0..600000"),
    ({"sync.port": 65535}, "sync.port must be in 1..65534"),
    ({"state_dir": "var/lib/nfq-sttcp"}, "state_dir must be an absolute path"),
    ({"tuning.garp_schedule_ms": [2000, 0]}, "garp_schedule_ms must be in increasing order"),
    ({"lan.primary": "10.77.0.1", "lan.backup": "10.77.0.1"}, "lan.primary and lan.backup are both 10.77.0.1"),
    ({"lan.primary": "10.77.0.1", "lan.backup": "10.77.0.2", "sync.backup": "10.77.0.1"},
     "lan.primary and sync.backup are both"),
    ({"lan.primary": "10.77.0.2", "lan.backup": "10.77.0.1", "sync.primary": "10.77.0.1"},
     "sync.primary and lan.backup are both"),
    ({"sync.key_file": "/dev/urandom"}, "not a regular file"),
])
def test_every_mistake_names_the_problem(over, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(**over)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("vip = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(str(bad))


def test_a_config_that_is_not_text_is_refused(tmp_path):
    p = tmp_path / "binary"
    p.write_bytes(b"vip = \"10.77.0.100\"\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        config.load(str(p))


def test_a_fifo_as_key_file_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)  # (opening it would block until a writer came)
    with pytest.raises(ConfigError, match="not a regular file"):
        cfg(**{"sync.key_file": str(fifo)})


def test_a_key_file_far_larger_than_a_key_is_refused(tmp_path):
    k = tmp_path / "key"
    k.write_bytes(b"k" * 5000)
    os.chmod(k, 0o600)
    with pytest.raises(ConfigError, match="larger than 4096 bytes"):
        cfg(**{"sync.key_file": str(k)})


def test_short_key_refused(tmp_path):
    k = tmp_path / "key"
    k.write_text("short")
    os.chmod(k, 0o600)
    with pytest.raises(ConfigError, match="shorter than 16"):
        cfg(**{"sync.key_file": str(k)})


def test_key_readable_by_others_refused(tmp_path):
    k = tmp_path / "key"
    k.write_text("0123456789abcdef0123")
    os.chmod(k, 0o640)
    with pytest.raises(ConfigError, match="readable by group or others: chmod 600"):
        cfg(**{"sync.key_file": str(k)})
    os.chmod(k, 0o600)
    assert cfg(**{"sync.key_file": str(k)}).read_key() == b"0123456789abcdef0123"


def test_render_round_trips(tmp_path):
    c = cfg(**{"lan.primary": "10.77.0.1", "lan.backup": "10.77.0.2", "tuning.garp_schedule_ms": [0, 50],
               "tuning.max_backup_lag_ms": 7})
    p = tmp_path / "c.toml"
    p.write_text(config.render_toml(c))
    again = config.load(str(p))
    assert again == c
