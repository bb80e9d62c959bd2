"""`nfq-sttcp doctor` on the lab's two hosts, and across the pair over the
sync link; then with a setting broken on purpose, which it must name."""

import json
import os
import subprocess
import sys

from nfq_sttcp import lab

CLI = [sys.executable, "-m", "nfq_sttcp"]


def doctor_pair():
    procs = {h: subprocess.Popen(["ip", "netns", "exec", lab.HOSTS[h]] + CLI + [
        "doctor", "--config", lab.config_path(), "--peer", "--wait", "20", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in ("primary", "backup")}
    out = {}
    for h, p in procs.items():
        stdout, stderr = p.communicate(timeout=60)
        out[h] = (p.returncode, json.loads(stdout) if stdout.strip() else {"stderr": stderr})
    return out


def test_doctor_passes_the_lab_and_names_what_breaks_a_migration(make_lab):
    make_lab()
    res = doctor_pair()
    for host, (rc, rep) in res.items():
        assert rep["role"] == host
        assert rc == 0, [f for f in rep["findings"] if f["level"] != "ok"]
        pair = [f["what"] for f in rep["findings"] if f["scope"] == "pair"]
        assert any(w.startswith("SACK alike") for w in pair) and any(w.startswith("window scale alike") for w in pair)
    assert not [n for n in lab.namespaces() if n.startswith("sttcp-doctor")]  # its scratch namespaces are gone
    ok = {f["what"] for f in res["backup"][1]["findings"] if f["level"] == "ok"}
    assert "kernel feature inbound in the kernel" in ok  # attached on a veth in its scratch namespace
    assert "kernel feature inbound in the kernel" not in [f["what"] for f in res["primary"][1]["findings"]]

    subprocess.run(["ip", "netns", "exec", lab.NS_BACKUP, "sysctl", "-qw", "net.ipv4.tcp_sack=0",
                    "net.ipv4.conf.all.arp_ignore=0"], check=True)
    res = doctor_pair()
    rc, rep = res["backup"]
    bad = {f["what"]: f for f in rep["findings"] if f["level"] == "fail"}
    assert rc == 1 and set(bad) == {"SACK", "sysctl net.ipv4.conf.all.arp_ignore"}, bad
    assert "net.ipv4.tcp_sack" in bad["SACK"]["fix"]
    assert bad["sysctl net.ipv4.conf.all.arp_ignore"]["fix"].startswith("sysctl -w net.ipv4.conf.all.arp_ignore=1")
    rc, rep = res["primary"]
    assert rc == 1 and [f["what"] for f in rep["findings"] if f["level"] == "fail"] == ["SACK"]


def test_doctor_tries_the_fast_path_where_it_is_on(make_lab):
    import glob
    import tempfile

    make_lab(fast_path=True)
    res = doctor_pair()
    for host, (rc, rep) in res.items():
        assert rc == 0, [f for f in rep["findings"] if f["level"] != "ok"]
        assert "fast path alike (on)" in [f["what"] for f in rep["findings"] if f["scope"] == "pair"]
    tried = [f["what"] for f in res["primary"][1]["findings"]]
    assert "kernel feature fast path" in tried  # loaded, pinned and matched in its scratch namespace
    assert "kernel feature fast path" not in [f["what"] for f in res["backup"][1]["findings"]]
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "nfq-sttcp-doctor-bpf-*"))
