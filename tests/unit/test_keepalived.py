import pytest

from nfq_sttcp import keepalived, lab


def test_the_two_confs_mirror_each_other():
    cfg = lab.lab_config(vip_owner="keepalived")
    p = keepalived.render(cfg, "primary", "/usr/bin/nfq-sttcp notify --config /etc/s.toml", advert_ms=50)
    b = keepalived.render(cfg, "backup", "/usr/bin/nfq-sttcp notify --config /etc/s.toml", advert_ms=50)
    assert "priority 150" in p and "priority 100" in b
    assert "unicast_src_ip 10.77.0.1" in p and "unicast_src_ip 10.77.0.2" in b
    assert "10.77.0.100/24 dev lan0" in p and "advert_int 0.05" in p and "nopreempt" in b
    assert 'notify "/usr/bin/nfq-sttcp notify --config /etc/s.toml"' in b
    with pytest.raises(ValueError, match="multiple of 10"):
        keepalived.render(cfg, "primary", "x", advert_ms=55)
    with pytest.raises(ValueError, match="LAN addresses"):
        keepalived.render(lab.lab_config().__class__(vip="10.0.0.9", ports=(1,), lan_interface="eth0",
                                                     primary_sync="10.1.0.1", backup_sync="10.1.0.2"),
                          "primary", "x")


def test_the_samples_are_the_rendered_confs():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    cfg = lab.lab_config(vip_owner="keepalived")
    for role in ("primary", "backup"):
        shipped = (root / "vagrant" / "keepalived" / ("keepalived-%s.conf" % role)).read_text()
        assert shipped == keepalived.render(cfg, role, keepalived.SAMPLE_NOTIFY), "regenerate: make keepalived-samples"
