"""Server side of test_takeover_trigger: a TCP stream whose segments are
dropped for a while after the stack sent them, as a backup's would be if its
own socket were the hold buffer; then, with nothing else moving it, one
forged client ACK whose single SACK block covers the last dropped segment.

Runs in the server's namespace, where the test has queued the server's
outbound segments (queue 1) and the client's inbound ones (queue 2). Prints
one JSON line of what it saw.

    held_stream.py SERVER_IP CLIENT_IP PORT PROMPT(0|1)
"""

import json
import select
import socket
import sys
import threading
import time

from netfilterqueue import NetfilterQueue

from nfq_sttcp import tcpseg
from nfq_sttcp.seqmath import seq_gt

server_ip, client_ip, port, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
PATTERN = bytes(i % 251 for i in range(251 * 261))  # 65511 bytes: the client checks every byte against it

st = {"hold": False, "stop": False, "held": 0, "last": None, "client_ack": None, "client_seq": None,
      "client_tsval": 0, "client_port": None, "server_tsval": 0, "after_hold": [], "prompt_at": None, "released_at": None}
lock = threading.Lock()


def outbound(pkt):
    seg = tcpseg.parse(pkt.get_payload())
    with lock:
        if seg.has_ts:
            st["server_tsval"] = seg.tsval
        if seg.payload_len and st["hold"]:
            if st["last"] is None or seq_gt(seg.end_seq, st["last"][1]):
                st["last"] = (seg.seq, seg.end_seq)
            st["held"] += 1
            pkt.drop()
            return
        if seg.payload_len and st["released_at"] is not None:
            st["after_hold"].append((time.monotonic(), seg.seq, seg.end_seq))
    pkt.accept()


def inbound(pkt):
    seg = tcpseg.parse(pkt.get_payload())
    with lock:
        if seg.flags & tcpseg.ACK:
            st["client_ack"] = seg.ack
        st["client_seq"], st["client_port"] = seg.end_seq, seg.sport
        if seg.has_ts:
            st["client_tsval"] = seg.tsval
    pkt.accept()


def run_queue(num, handler):
    q = NetfilterQueue()
    q.bind(num, handler, max_len=4096)
    fd = q.get_fd()
    while not st["stop"]:
        if select.select([fd], [], [], 0.05)[0]:
            q.run(block=False)
    q.unbind()


def sender(conn):
    try:
        while not st["stop"]:
            conn.sendall(PATTERN)
    except OSError:
        pass
    finally:
        conn.close()


for num, handler in ((1, outbound), (2, inbound)):
    threading.Thread(target=run_queue, args=(num, handler), daemon=True).start()
lsock = socket.socket()
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind((server_ip, port))
lsock.listen()
print("LISTENING", flush=True)
conn, _ = lsock.accept()
threading.Thread(target=sender, args=(conn,), daemon=True).start()
time.sleep(0.5)
with lock:
    st["hold"] = True
time.sleep(0.2)  # the stack's loss probe goes out (and is dropped) in here
with lock:
    st["hold"] = False
    st["released_at"] = time.monotonic()
time.sleep(1.0)  # with rto_min 5 s, nothing may move the stack in here but the prompt
with lock:
    quiet = len(st["after_hold"])
    last, ack, cseq, ctsval, stsval = st["last"], st["client_ack"], st["client_seq"], st["client_tsval"], st["server_tsval"]
if last is None or ack is None:
    print(json.dumps({"error": "nothing held, or no client segment seen", "held": st["held"]}), flush=True)
    st["stop"] = True
    sys.exit(1)
if prompt:
    opts = tcpseg.ts_option(ctsval + 1, stsval) + tcpseg.sack_option([last])
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with lock:
        st["prompt_at"] = time.monotonic()
    raw.sendto(tcpseg.build_segment(client_ip, server_ip, st["client_port"], port, cseq, ack,
                                    tcpseg.ACK, 4096, opts), (server_ip, 0))
time.sleep(1.0)
with lock:
    st["stop"] = True
    t0 = st["prompt_at"]
    resends = [(round((t - t0) * 1000, 2), s, e) for t, s, e in st["after_hold"]] if t0 else []
print(json.dumps({"held": st["held"], "last": last, "snd_una": ack, "quiet_resends": quiet,
                  "resends": resends[:5], "n_resends": len(resends),
                  "sacked_resent_ms": next((ms for ms, s, _e in resends if s == last[0]), None)}), flush=True)
time.sleep(0.2)
