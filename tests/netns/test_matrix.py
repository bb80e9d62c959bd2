"""The fault matrix as tests: every crash point x every workload at one
connection, and mid-stream at 5 % loss on the clone path and the sync link
(the full matrix, with 100 connections and 1 % loss too, is
'nfq-sttcp lab matrix'). A cell passes when every connection is byte-exact,
the client saw no RST and never reconnected, and the backup took over."""

import glob
import os

import pytest

from nfq_sttcp import matrix

CELLS = [(p, w, 1, 0) for p in matrix.POINTS for w in matrix.WORKLOADS] + \
    [("mid", w, 1, 5) for w in matrix.WORKLOADS] + [("mid", w, 100, 0) for w in ("echo", "banner")]


@pytest.mark.parametrize("point,workload,conns,loss", CELLS, ids=["%s-%s-%dconn-%dpct" % c for c in CELLS])
def test_cell(point, workload, conns, loss, tmp_path):
    cell = matrix.run_cell(point, workload, conns, loss, keep_dir=str(tmp_path))
    print(matrix.table([cell]))
    if not cell.ok:
        # A failure here is rare and timing-bound: put the evidence in the
        # test's output (all CI keeps), the daemons' warnings first.
        for log in sorted(glob.glob(os.path.join(str(tmp_path), "**", "*-daemon.log"), recursive=True)):
            with open(log, errors="replace") as f:
                lines = [ln.rstrip()[:400] for ln in f if "heartbeat" not in ln]
            print("== %s (%d lines, the last 40)" % (log, len(lines)))
            print("\n".join(lines[-40:]))
    assert cell.ok, "%s failed:\n  %s" % (cell.name, "\n  ".join(cell.failures[:10]))
