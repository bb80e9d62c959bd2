"""A non-deterministic server for the divergence test: each request line is
answered with the time and random bytes. Everything it sends is appended to
the file named by the first argument, with the role (STTCP_ROLE) in the name."""

import os
import socket
import sys
import threading
import time


def serve(conn, out):
    with conn:
        f = conn.makefile("rb")
        for _line in f:
            reply = b"%d %s\n" % (time.time_ns(), os.urandom(8).hex().encode())
            conn.sendall(reply)
            with open(out, "ab") as log:
                log.write(reply)


def main():
    out = "%s-%s.out" % (sys.argv[1], os.environ.get("STTCP_ROLE", "app"))
    srv = socket.create_server(("0.0.0.0", 7010), reuse_port=False)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, out), daemon=True).start()


if __name__ == "__main__":
    main()
