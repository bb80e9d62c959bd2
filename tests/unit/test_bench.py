"""The benchmark's report (pure): ratios and differences side by side, and
the failover split; the measuring itself runs in the lab (make bench)."""

import pytest

from nfq_sttcp import bench


def test_table_gives_ratios_differences_and_the_failover_split():
    res = {"modes": {
        "plain": {"down_veth_gbps": 8.0, "up_veth_gbps": 6.0, "rr1_p50_us": 40.0, "conn_per_s": 2000.0,
                  "conn_per_s_together": 4000.0, "conn_per_s_together_runs": [3900.0, 4000.0, 4400.0],
                  "conn_per_s_loaded": 5000.0, "conn_per_s_loaded_runs": [5000.0, 4800.0, 5100.0],
                  "cpu_s_per_gbit": {"down": {"all": 0.16}}},
        "sttcp": {"down_veth_gbps": 2.0, "up_veth_gbps": 3.0, "rr1_p50_us": 140.0, "conn_per_s": 500.0,
                  "conn_per_s_together": 1000.0, "conn_per_s_together_runs": [700.0, 1000.0, 1040.0],
                  "conn_per_s_loaded": 1500.0, "conn_per_s_loaded_runs": [1500.0, 1400.0, 1600.0],
                  "idle_opened": 100, "idle_protected": 100, "bytes_per_conn": {"primary": 2048, "backup": 4096},
                  "cpu_us_per_packet": {"primary_down": 20.5},
                  "cpu_s_per_gbit": {"down": {"all": 0.87, "daemons": 0.68}, "up": {"all": 0.5, "daemons": 0.3}},
                  "rr1_pairs_us": [[300.0, 420.0], [250.0, 500.0], [330.0, 310.0]],
                  "rr1_pairs_placed_us": [[120.0, 150.0], [125.0, 160.0], [130.0, 150.0]],
                  "congestion_control": {"client": "bbr", "primary": "bbr", "backup": "reno"}}},
        "failover": {"50x3": {"down": [{"gap_ms": 170.0, "detection_ms": 152.0, "takeover_ms": 9.0, "resume_ms": 30.0},
                                       {"failed": 1.0}],
                              "echo": [{"failed": 1.0}]}},
        "fast_path": {"256": {"down": {"pairs": [[10.0, 3.0], [9.0, 3.6]], "fast_packets": 1, "queued_packets": 99,
                                       "held_packets": 40}},
                      "256+25ms": {"down": {"pairs": [[10.0, 5.5]], "fast_packets": 9, "queued_packets": 1}},
                      "0": {"down": {"pairs": [[8.0, 6.0]], "fast_packets": 0, "queued_packets": 0}}}}
    t = bench.table(res)
    assert ("fast path, lag 256 KB or 25 ms at the backup's pace, unshaped download: 5.5 Gbit/s against plain 10.0; "
            "ratio 0.55") in t
    assert ("fast path, lag 256 KB alone, unshaped download: 3.0/3.6 Gbit/s against plain 10.0/9.0; ratio 0.30 median "
            "(0.30 to 0.40); 1% of the primary's segments fast, 40 gate drops (each try of TCP's counts)") in t
    assert "fast path, no lag bound, unshaped download: 6.0 Gbit/s against plain 8.0; ratio 0.75" in t
    assert "download Gbit/s, unshaped veth" in t and " 0.25" in t
    assert "upload Gbit/s, unshaped veth" in t and " 0.50" in t
    assert "+100 us" in t  # latency added, not a ratio
    assert "3 alternating pairs: added +120 us median (-20 to +250)" in t  # each pair's difference, then the median
    assert "3 alternating pairs, hosts on CPUs of their own: added +30 us median (+20 to +35)" in t
    together = [line for line in t.splitlines() if line.startswith("new connections/s, 4 clients")][0]
    assert together.split()[-3:] == ["4000", "1000", "0.25"]
    assert ("new connections/s, 4 clients, the runs (medians above): plain 3900, 4000, 4400; "
            "nfq-sttcp 700, 1000, 1040") in t
    assert "1 client, the runs" not in t, "one run each: nothing more to show"
    loaded = [line for line in t.splitlines() if line.startswith("new connections/s, 16 clients")][0]
    assert loaded.split()[-3:] == ["5000", "1500", "0.30"]
    assert ("new connections/s, 16 clients, the runs (medians above): plain 5000, 4800, 5100; "
            "nfq-sttcp 1500, 1400, 1600") in t
    one = [line for line in t.splitlines() if line.startswith("new connections/s, 1 client ")][0]
    assert one.split()[-3:] == ["2000", "500", "0.25"]
    assert "download Gbit/s, 1 Gbit/s tbf" not in t  # not measured: no made-up row
    assert "unshaped download (all CPUs): plain 0.160, nfq-sttcp 0.870, of it the daemons 0.680" in t
    assert "unshaped upload" not in t  # plain TCP's half is missing: no row
    assert "100 opened, 100 protected" in t and "backup 4096 B" in t and "primary_down 20.5" in t
    down = [line for line in t.splitlines() if line.startswith("50x3") and " down " in line][0]
    assert "1/2" in down and "170 ms" in down and "152 ms" in down
    assert [line for line in t.splitlines() if " echo " in line][0].endswith("all failed")
    assert "TCP congestion control: client bbr, primary bbr, backup reno" in t


def test_percentile_and_a_bad_client_spec():
    assert bench._pct([5, 1, 3, 2, 4], 0.5) == 3 and bench._pct([1, 2, 3], 0.99) == 3
    with pytest.raises(ValueError, match="unknown bench client kind"):
        bench.client_main({"kind": "warp", "host": "127.0.0.1"})


def test_the_time_sequence_plots_title_rounds_its_figures():
    assert bench._ms(31.738867997773923) == "31.7 ms" and bench._ms(None) == "unknown"


def test_table_compares_the_backups_inbound_program_on_and_off():
    res = {"modes": {"plain": {}, "sttcp": {}}, "failover": {},
           "fast_inbound": {"on": {"pairs": [[10.0, 6.0], [8.0, 5.6]], "kernel_mapped": 3000, "queued_packets": 900,
                                   "rr1_pairs_us": [[130.0, 200.0], [140.0, 230.0], [120.0, 300.0]]},
                            "off": {"pairs": [[10.0, 4.0]], "kernel_mapped": 0, "queued_packets": 6000}}}
    t = bench.table(res)
    assert ("backup's inbound program on, unshaped upload: 6.0/5.6 Gbit/s against plain 10.0/8.0; ratio 0.60 median "
            "(0.60 to 0.70); 3000 clones mapped in the kernel, 900 packets through the backup's queues") in t
    assert "backup's inbound program off, unshaped upload: 4.0 Gbit/s against plain 10.0; ratio 0.40" in t
    assert ("backup's inbound program on, 1-byte request-response: +90 us added at p50, median of 3 alternating "
            "pairs (+70 to +180)") in t
    assert "program off, 1-byte" not in t, "(a run without the pairs shows none)"
    assert "new connections" not in t, "(nor one without the rates, as an older bench.json)"


def test_table_says_how_much_cpu_the_hypervisor_took_in_each_step():
    res = {"modes": {"plain": {}, "sttcp": {}}, "failover": {},
           "steal": {"plain": 0.004, "sttcp": 0.118, "failover 50x3": 0.0}}
    t = bench.table(res)
    assert "CPU time the hypervisor took (steal), per step: plain 0%, sttcp 12%, failover 50x3 0%" in t
    assert "steal" not in bench.table({"modes": {"plain": {}, "sttcp": {}}, "failover": {}})  # not measured: no line


def test_steal_meter_shares_every_cpus_time_and_survives_a_failed_read_and_step():
    clock, stolen = iter([100.0, 110.0, 200.0, 201.0]), iter([(5.0, 2), (7.0, 2)])
    meter = bench._StealMeter(read=lambda: next(stolen), clock=lambda: next(clock))
    with meter.step("sttcp"):
        pass
    assert meter.shares == {"sttcp": 0.1}  # 2 s of 2 CPUs x 10 s

    def unreadable():
        raise OSError("no /proc")

    meter.read = unreadable
    with pytest.raises(RuntimeError, match="the step's own"):  # its error, not the meter's, comes out
        with meter.step("failover 10x3"):
            raise RuntimeError("the step's own failure")
    assert meter.shares == {"sttcp": 0.1}  # no share for a step it could not read


def test_cpu_stat_reads_the_steal_column_and_counts_the_cpus(tmp_path):
    stat = tmp_path / "stat"
    hz = bench.os.sysconf("SC_CLK_TCK")
    stat.write_text("cpu  1548483 94 711027 11306331 6127 0 111851 %d 0 0\n"
                    "cpu0 1 2 3 4 5 6 7 8 9 10\ncpu1 1 2 3 4 5 6 7 8 9 10\nintr 5 6\n" % (3 * hz))
    assert bench._cpu_stat(str(stat)) == (3.0, 2)
    stat.write_text("cpu  1 2 3 4 5 6 7\ncpu0 1 2 3 4 5 6 7\n")  # a kernel too old to count steal
    assert bench._cpu_stat(str(stat)) == (0.0, 1)
