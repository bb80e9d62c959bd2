"""The fault matrix as tests: every crash point x every workload at one
connection, and mid-stream at 5 % loss on the clone path and the sync link
(the full matrix, with 100 connections and 1 % loss too, is
'nfq-sttcp lab matrix'). A cell passes when every connection is byte-exact,
the client saw no RST and never reconnected, and the backup took over."""

import pytest

from nfq_sttcp import matrix

CELLS = [(p, w, 1, 0) for p in matrix.POINTS for w in matrix.WORKLOADS] + \
    [("mid", w, 1, 5) for w in matrix.WORKLOADS] + [("mid", w, 100, 0) for w in ("echo", "banner")]


@pytest.mark.parametrize("point,workload,conns,loss", CELLS, ids=["%s-%s-%dconn-%dpct" % c for c in CELLS])
def test_cell(point, workload, conns, loss):
    cell = matrix.run_cell(point, workload, conns, loss)
    print(matrix.table([cell]))
    assert cell.ok, "%s failed:\n  %s" % (cell.name, "\n  ".join(cell.failures[:10]))
