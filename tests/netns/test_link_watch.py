"""A running daemon keeps watching its links' BIG TCP sizes when the links
change under it: a link made again under its name, a port added to a bridge
(real links in a namespace of this test; the daemon's own start check and
recheck, called in that namespace)."""

import json
import subprocess
import sys

from .checks import big_tcp
from .test_errors import ns, write_config  # noqa: F401 (ns is a fixture)

# Run in the test's namespace: the start check, then one recheck after each
# change the test makes (it waits on stdin between them), printing what the
# daemon then says.
WATCH = r"""
import json, sys
from structlog.testing import capture_logs
from nfq_sttcp import config, nfqueue
from nfq_sttcp.driver import Daemon
d = Daemon(config.load(sys.argv[1]), "primary")
d._check_host()
print(json.dumps({"watched": sorted(d._size_links)}), flush=True)
for line in sys.stdin:
    if line.strip() == "later":
        d._sizes_listed_at -= nfqueue.SIZES_RELIST_S + 1  # (as if the listing were that old)
    with capture_logs() as logs:
        d._recheck_packet_sizes()
    print(json.dumps({"watched": sorted(d._size_links), "oversize": d.oversize_links(),
                      "raised": d.counters["packet_sizes_raised"],
                      "events": [(e["event"], e.get("interface")) for e in logs]}), flush=True)
"""


def ip(netns, *args):
    subprocess.run(["ip", "-n", netns] + list(args), check=True)


def test_a_link_made_again_and_a_new_bridge_port_are_watched(ns, tmp_path):  # noqa: F811
    conf = write_config(tmp_path)
    ip(ns, "link", "add", "lan0", "type", "bridge")
    ip(ns, "link", "add", "port0", "type", "veth", "peer", "name", "port0p")
    ip(ns, "link", "set", "port0", "master", "lan0")
    ip(ns, "link", "add", "sync0", "type", "veth", "peer", "name", "sync0p")
    ip(ns, "addr", "add", "10.77.0.1/24", "dev", "lan0")
    ip(ns, "addr", "add", "10.78.0.1/24", "dev", "sync0")
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", WATCH, conf], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)

    def recheck(how="now"):
        p.stdin.write(how + "\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert line, "the watching daemon died"
        got = json.loads(line)
        got["events"] = [tuple(e) for e in got["events"]]
        return got

    try:
        start = json.loads(p.stdout.readline())
        assert start["watched"] == ["lan0", "port0", "port0p", "sync0", "sync0p"], start
        # sync0 deleted and made again, its new index raised to BIG TCP
        ip(ns, "link", "del", "sync0")
        ip(ns, "link", "add", "sync0", "type", "veth", "peer", "name", "sync0p")
        big_tcp(ns, "sync0", 131072)
        got = recheck()
        assert got["oversize"] == ["sync0"] and got["raised"] == 1, got
        assert ("packet_sizes_raised", "sync0") in got["events"], got
        assert not any(e == "packet_sizes_unknown" for e, _ in got["events"]), "listed again, not given up: %s" % got
        big_tcp(ns, "sync0", 65536)
        got = recheck()
        assert got["oversize"] == [] and ("packet_sizes_restored", "sync0") in got["events"], got
        # a port added to the bridge later, already raised: found at the next listing
        ip(ns, "link", "add", "port1", "type", "veth", "peer", "name", "port1p")
        big_tcp(ns, "port1", 196608)
        ip(ns, "link", "set", "port1", "master", "lan0")
        assert recheck()["oversize"] == [], "within the minute, the listing stands"
        got = recheck("later")
        assert "port1" in got["watched"] and got["oversize"] == ["port1"] and got["raised"] == 2, got
        # a port taken out of the bridge: no longer ours to watch, and no longer degrading the status
        ip(ns, "link", "set", "port1", "nomaster")
        got = recheck("later")
        assert "port1" not in got["watched"] and got["oversize"] == [], got
        assert ("packet_sizes_link_gone", "port1") in got["events"], got
    finally:
        p.kill()
        p.wait()
