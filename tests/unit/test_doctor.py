"""The doctor's judgements (pure): facts in, findings with fixes out."""

import dataclasses
import os

from nfq_sttcp import doctor, lab
from nfq_sttcp.doctor import FAIL, OK, WARN

CFG = lab.lab_config()


def facts(role="backup", **over):
    f = {"role": role, "root": True, "iptables": "iptables v1.8.9 (nf_tables)",
         "features": {"NFQUEUE": "", "TEE": "", "conntrack": "", "mark": "", "nfnetlink_queue": ""},
         "sysctls": dict(doctor.backup_sysctls("lan0", "sync0"), **{
             "net.ipv4.tcp_timestamps": "1", "net.ipv4.tcp_sack": "1", "net.ipv4.tcp_window_scaling": "1",
             "net.ipv4.tcp_rmem": "4096 131072 6291456", "net.core.rmem_max": "212992"}),
         "lan_mtu": 1500, "addresses": ["10.77.0.2", "10.78.0.2"], "sync_if": "sync0",
         "listening": [22, 7000, 7001, 7002, 7003, 7004], "c_extension": {"built": True, "crc32c_hw": True}}
    for k, v in over.items():
        if k == "sysctls":
            f["sysctls"] = dict(f["sysctls"], **v)
        else:
            f[k] = v
    return f


def levels(findings):
    return {f.what: f.level for f in findings}


def test_a_good_host_passes_and_each_problem_is_named_with_its_fix():
    assert all(f.level == OK for f in doctor.check_host(facts(), CFG))
    bad = doctor.check_host(facts(features={"NFQUEUE": "No chain/target/match by that name", "TEE": ""},
                                  sysctls={"net.ipv4.conf.sync0.rp_filter": "1"}, listening=[22],
                                  iptables="iptables v1.8.9 (legacy)"), CFG)
    by = {f.what: f for f in bad}
    assert by["kernel feature NFQUEUE"].level == FAIL and "xt_NFQUEUE" in by["kernel feature NFQUEUE"].fix
    assert by["sysctl net.ipv4.conf.sync0.rp_filter"].fix.startswith("sysctl -w net.ipv4.conf.sync0.rp_filter=0")
    assert by["application"].level == WARN and "7000" in by["application"].detail
    assert by["iptables backend"].level == WARN
    slow = {f.what: f for f in doctor.check_host(facts(c_extension={"built": False, "crc32c_hw": False}), CFG)}
    assert slow["C extension"].level == WARN and "build-essential" in slow["C extension"].fix
    assert not any(f.what.startswith("C extension (checksums") for f in slow.values()), "no OK beside the warning"
    no_bpf = {f.what: f for f in doctor.check_host(
        facts(c_extension={"built": True, "crc32c_hw": True, "bpf_built": False}), CFG)}
    assert no_bpf["C extension (bpf)"].level == WARN and "ctypes" in no_bpf["C extension (bpf)"].detail
    assert "C extension (bpf)" not in {f.what for f in doctor.check_host(
        facts(c_extension={"built": True, "crc32c_hw": True, "bpf_built": False}),
        dataclasses.replace(CFG, fast_inbound=False, fast_path=False))}, "no kernel path: no map calls"
    assert levels(doctor.check_host(facts(root=False), CFG)) == {"privilege": FAIL}
    # the primary needs none of the backup's ARP settings
    assert all(f.level == OK for f in doctor.check_host(
        facts("primary", addresses=["10.77.0.1", "10.78.0.1"], sysctls={"net.ipv4.conf.all.arp_ignore": "0"}), CFG))


def test_the_pair_differences_that_break_a_migration():
    a, b = facts("primary"), facts()
    assert all(f.level == OK for f in doctor.compare(a, b))
    # timestamps 1 (random offsets) and 2 (none) both put the option in the SYN-ACK
    assert all(f.level == OK for f in doctor.compare(a, facts(sysctls={"net.ipv4.tcp_timestamps": "2"})))
    got = levels(doctor.compare(a, facts(sysctls={"net.ipv4.tcp_sack": "0", "net.ipv4.tcp_rmem": "4096 131072 33554432"},
                                         lan_mtu=9000, listening=[7000])))
    assert got["SACK"] == FAIL and got["window scale"] == FAIL and got["MTU"] == FAIL
    assert got["listening ports differ"] == WARN
    assert levels(doctor.compare(facts("primary", fast_path=True), facts(fast_path=False)))["fast path"] == WARN
    assert levels(doctor.compare(facts("primary", fast_path=True), facts(fast_path=True)))["fast path alike (on)"] == OK
    assert levels(doctor.compare(facts("primary", lag_bound=[256, 25]), facts(lag_bound=[256, 0])))["lag bound"] == WARN
    assert levels(doctor.compare(facts("primary", lag_bound=[256, 25]), facts(lag_bound=[256, 25])))[
        "lag bound alike (256 KB, 25 ms)"] == OK
    missing = {f.what: f for f in doctor.check_host(facts("primary", addresses=["10.77.0.1", "10.78.0.1"],
                                                          features={"fast path": "cannot create the eBPF map"}), CFG)}
    assert missing["kernel feature fast path"].level == FAIL and "xt_bpf" in missing["kernel feature fast path"].fix


def test_window_scale_follows_the_largest_receive_buffer():
    assert doctor.window_scale({"net.ipv4.tcp_rmem": "4096 131072 6291456", "net.core.rmem_max": "212992"}) == 7
    assert doctor.window_scale({"net.ipv4.tcp_rmem": "4096 131072 6291456", "net.core.rmem_max": "67108864"}) == 11
    assert doctor.window_scale({"net.ipv4.tcp_rmem": "4096 131072 6291456", "net.ipv4.tcp_window_scaling": "0"}) == 0
    assert doctor.window_scale({"net.ipv4.tcp_rmem": "garbage"}) is None


def test_facts_are_signed_with_the_sync_key():
    key = b"k" * 32
    data = doctor._sign(key, b'{"doctor": 1}')
    assert doctor._verify(key, data) == b'{"doctor": 1}'
    assert doctor._verify(key, data[:-1] + bytes([data[-1] ^ 1])) is None
    assert doctor._verify(b"x" * 32, data) is None


def test_a_link_that_carries_big_tcp_packets_fails_with_its_fix():
    ok = {"lan0": {"gso_ipv4_max_size": 65536, "gro_ipv4_max_size": 65536}, "sync0": {"gso_ipv4_max_size": 65536}}
    assert levels(doctor.check_host(facts(packet_sizes=ok), CFG))["packets within 64 KB on lan0, sync0"] == OK
    # a kernel before 6.3 reports neither size (nothing over 64 KB there); a link not read is a warning
    by = {f.what: f for f in doctor.check_host(facts(packet_sizes={"lan0": {}, "sync0": None}), CFG)}
    assert by["packet size sync0"].level == WARN and "could not be read" in by["packet size sync0"].detail
    assert "packet size lan0" not in by and "packets within 64 KB on lan0, sync0" not in by
    big = dict(ok, sync0={"gso_ipv4_max_size": 65536, "gro_ipv4_max_size": 196608})
    by = {f.what: f for f in doctor.check_host(facts(packet_sizes=big), CFG)}
    assert by["packet size sync0"].level == FAIL and "packets within 64 KB on lan0, sync0" not in by
    assert "gro_ipv4_max_size 196608" in by["packet size sync0"].detail
    assert by["packet size sync0"].fix.startswith("ip link set dev sync0 gso_ipv4_max_size 65536 gro_ipv4_max_size 65536")
    assert "packet size lan0" not in by


def test_a_backup_whose_stack_paces_itself_is_warned_with_its_fix():
    f = {x.what: x for x in doctor.check_host(facts(sysctls={"net.ipv4.tcp_congestion_control": "bbr"}), CFG)}
    assert f["congestion control"].level == WARN and "paces" in f["congestion control"].detail
    assert f["congestion control"].fix.startswith("sysctl -w net.ipv4.tcp_congestion_control=reno")
    assert all(x.level == OK for x in doctor.check_host(facts(sysctls={"net.ipv4.tcp_congestion_control": "reno"}), CFG))


def test_a_backup_on_cubic_or_saving_route_metrics_is_warned_with_its_fix():
    f = {x.what: x for x in doctor.check_host(facts(sysctls={"net.ipv4.tcp_congestion_control": "cubic"}), CFG)}
    assert f["congestion control"].level == WARN and "HyStart" in f["congestion control"].detail
    assert f["congestion control"].fix.startswith("sysctl -w net.ipv4.tcp_congestion_control=reno")
    f = {x.what: x for x in doctor.check_host(facts(sysctls={"net.ipv4.tcp_no_metrics_save": "0"}), CFG)}
    assert f["tcp_no_metrics_save"].level == WARN
    assert f["tcp_no_metrics_save"].fix.startswith("sysctl -w net.ipv4.tcp_no_metrics_save=1")
    assert "congestion control" not in f
    # the primary's is its own business: it paces what the client receives
    assert all(x.level == OK for x in doctor.check_host(facts(
        "primary", addresses=["10.77.0.1", "10.78.0.1"],
        sysctls={"net.ipv4.tcp_congestion_control": "bbr", "net.ipv4.tcp_no_metrics_save": "0"}), CFG))


def test_the_state_dir_must_be_writable_and_survive_a_reboot():
    ok = levels(doctor.check_host(facts(state_dir={"path": "/var/lib/nfq-sttcp", "writable": True,
                                                   "fstype": "ext4"}), CFG))
    assert ok["state_dir /var/lib/nfq-sttcp kept across reboots"] == OK
    found = doctor.check_host(facts(state_dir={"path": "/run/x", "writable": True, "fstype": "tmpfs"}), CFG)
    tmp = [f for f in found if f.what == "state_dir"]
    assert tmp[0].level == WARN and "forgotten at reboot" in tmp[0].detail, tmp
    found = doctor.check_host(facts(state_dir={"path": "/ro/x", "writable": False, "fstype": "ext4"}), CFG)
    ro = [f for f in found if f.what == "state_dir"]
    assert ro[0].level == WARN and "cannot be written" in ro[0].detail, ro


def test_the_state_dir_facts_of_a_real_directory(tmp_path):
    got = doctor._state_dir(str(tmp_path / "not" / "yet"))  # created at the first start
    assert got["writable"] is True and got["fstype"]
    assert got["path"] == str(tmp_path / "not" / "yet")


def test_a_state_dir_that_is_a_file_or_a_link_into_a_tmpfs_is_not_ok(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    got = doctor._state_dir(str(f))
    assert got["writable"] is False and got["problem"] == "not a directory"
    found = [x for x in doctor.check_host(facts(state_dir=got), CFG) if x.what == "state_dir"]
    assert found[0].level == WARN and "not a directory" in found[0].detail
    link = tmp_path / "link"
    os.symlink("/dev/shm", link)  # a tmpfs
    assert doctor._state_dir(str(link / "x"))["fstype"] == "tmpfs"
    unknown = [x for x in doctor.check_host(facts(state_dir={"path": "/x", "writable": True, "fstype": None}), CFG)
               if x.what == "state_dir"]
    assert unknown[0].level == WARN
