"""Replay a capture recorded from the lab's applications against the lab,
crashing the primary part-way: every answer byte-exact."""

import json
import os
import subprocess
import sys

from nfq_sttcp import lab

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "captures", "lab-mixed.pcap")


def test_replaying_a_capture_across_a_primary_crash_is_byte_exact(make_lab):
    make_lab()
    r = subprocess.run([sys.executable, "-m", "nfq_sttcp", "replay", SAMPLE, "--target", lab.VIP, "--speed", "0.5",
                        "--crash-primary-at", "0.3s", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["crashed"] and report["ok"], report
    conns = report["connections"]
    assert len(conns) == 5 and all(c["received"] == c["expected"] > 0 for c in conns), conns
    assert any(c["failover_gap_ms"] is not None for c in conns), conns
    st = lab.status()
    assert st["daemons"]["backup"]["state"] == "active" and st["vip_owner"] == ["backup"]
    print("replay across the crash: gaps %s" % [c["failover_gap_ms"] for c in conns])
