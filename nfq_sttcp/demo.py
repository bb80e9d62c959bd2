"""``nfq-sttcp demo`` (``make demo``): every kind of traffic across a primary crash.

Brings the lab up, opens an echo session, a bulk download, a bulk upload and
a banner session at once, crashes the primary while all four are mid-stream,
checks every byte, reads the client's capture for RSTs and second SYNs, and
prints one line per connection with the failover gap measured at the client.
"""

from __future__ import annotations

import json
import os
import time

from . import lab, scenario


# The bulk transfers' pace. Unpaced, the two of them keep all of a 2-vCPU
# machine busy (client, two applications, two daemons and tcpdump share it),
# and the echo and banner replies then wait 50-130 ms for a CPU before the
# crash: that wait is part of the gap as measured (from the last byte before
# the crash) though no failover causes it. ``--rate-mbit 0`` runs them unpaced.
DEFAULT_RATE_MBIT = 200


def run(download_mb: int = 50, upload_mb: int = 50, out_dir: str = "demo-out",
        rate_mbit: int = DEFAULT_RATE_MBIT) -> int:
    pace = ",rate_kbps=%d" % (rate_mbit * 1000) if rate_mbit else ""
    conns = [
        "echo:count=30,size=2000,pause_ms=20,crash_msg=10,inside=1,after=10",
        "download:bytes=%d,crash_at=%d%s" % (download_mb << 20, (download_mb << 20) // 3, pace),
        "upload:bytes=%d,crash_at=%d%s" % (upload_mb << 20, (upload_mb << 20) // 3, pace),
        "banner:lines=30,pause_ms=20,crash_line=10,after=10",
    ]
    if lab.namespaces():
        print("demo: removing a lab left from before")
        lab.down(quiet=True)
    t0 = time.monotonic()
    cfg = lab.up()
    detection = cfg.detection_ms
    os.makedirs(out_dir, exist_ok=True)
    try:
        print("demo: traffic started; the primary is crashed once every connection is mid-stream")
        report = scenario.run_with_crash(conns, capture_dir=os.path.abspath(out_dir))
        st = lab.status()
    finally:
        os.environ["STTCP_LAB_KEEP_LOGS"] = os.path.abspath(out_dir)
        lab.down(quiet=True)
    failover = st["daemons"].get("backup", {}).get("failover", {})
    budget = detection + 100
    print()
    print("configured detection time: %d ms (%d x %d ms heartbeats); gap budget %d ms"
          % (detection, cfg.heartbeat_missed, cfg.heartbeat_interval_ms, budget))
    print("bulk transfers %s" % ("paced at %d Mbit/s each" % rate_mbit if rate_mbit else "unpaced"))
    print("backup: detection %s ms, takeover %s ms, VIP now on: %s"
          % (failover.get("detection_ms"), failover.get("takeover_ms"), ", ".join(st["vip_owner"]) or "nobody"))
    print()
    print("%-9s %-6s %14s %5s %5s %8s %12s %9s  %s" % ("kind", "port", "bytes verified", "RSTs", "SYNs",
                                                        "gap ms", "after crash", "app wait", "result"))
    failed = 0
    for c in report["connections"]:
        problems = []
        if not c["ok"]:
            problems.append(c.get("error") or "not verified")
        if not c.get("in_capture"):
            problems.append("not in the client's capture")
        elif c["rsts_received"]:
            problems.append("client saw RST")
        elif c["syns_sent"] != 1:
            problems.append("client sent %d SYNs" % c["syns_sent"])
        gap = c.get("wire_gap_ms")
        if gap is None:
            problems.append("no gap measured")
        elif gap > budget:
            problems.append("gap over budget")
        failed += bool(problems)
        unknown = "-" if not c.get("in_capture") else None
        print("%-9s %-6d %14d %5s %5s %8s %12s %9s  %s" % (
            c["kind"], c["port"], c["verified"], unknown or c["rsts_received"], unknown or c["syns_sent"],
            gap, c.get("wire_resume_ms"), c.get("gap_ms"), "ok" if not problems else "FAIL: " + "; ".join(problems)))
    if not report["connections"]:
        failed += 1
        print("no connections reported: %s" % report.get("error"))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"report": report, "status": st}, f, indent=1, default=str)
    print()
    print("demo %s in %.0f s (capture, logs and report.json in %s/)"
          % ("PASSED" if not failed else "FAILED", time.monotonic() - t0, out_dir))
    return 1 if failed else 0
