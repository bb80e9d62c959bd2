import os
import pathlib

from nfq_sttcp import lab, rules

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_primary_fails_open_backup_fails_closed():
    c = lab.lab_config()
    p = rules.render(c, "primary")
    b = rules.render(c, "backup")
    assert "--queue-bypass" in p
    assert "NFQUEUE" in b and "--queue-bypass" not in b
    assert "TEE --gateway 10.78.0.2" in p
    assert "-m mark ! --mark 0x5717" in p and "-m mark ! --mark 0x5717" in b


def test_rules_live_only_in_our_chains():
    c = lab.lab_config()
    for role in ("primary", "backup"):
        for line in rules.render(c, role).splitlines():
            if line.startswith("-A"):
                assert line.split()[1].startswith("STTCP-")
            if line.startswith("-I"):
                assert line.split()[-1].startswith("STTCP-"), line


def test_many_ports_are_split_for_multiport():
    c = lab.lab_config(ports=tuple(range(8000, 8040)))
    text = rules.render(c, "backup")
    assert text.count("--dports") == 3


def test_fence_drops_replies_and_queues_nothing():
    text = rules.render(lab.lab_config(), "backup", fence=True)
    assert "NFQUEUE" not in text and "-j DROP" in text


def test_files_in_iptables_dir_are_the_rendered_rules():
    c = lab.lab_config()
    for role in ("primary", "backup"):
        shipped = (ROOT / "iptables" / ("%s.rules" % role)).read_text()
        assert shipped == rules.render(c, role), "regenerate with: make iptables-rules"
    for script in ("apply", "remove"):
        assert os.access(ROOT / "iptables" / script, os.X_OK)


def test_cloning_chain_is_replaced_whole():
    c = lab.lab_config()
    on, off = rules.render_cloning(c, True), rules.render_cloning(c, False)
    assert ":STTCP-TEE - [0:0]" in on and "TEE --gateway 10.78.0.2" in on
    assert ":STTCP-TEE - [0:0]" in off and "TEE" not in off.replace("STTCP-TEE", "")
    assert "TEE --gateway" not in rules.render(c, "primary", clone=False)
