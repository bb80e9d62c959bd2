"""Command line: ``nfq-sttcp`` and ``python -m nfq_sttcp``.

Logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

import structlog

from . import __version__
from .config import Config, ConfigError


def configure_logging(fmt: str, verbose: bool) -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _die(msg: str, code: int = 2) -> int:
    print("nfq-sttcp: %s" % msg, file=sys.stderr)
    return code


def _load(path: str) -> Config:
    from . import config
    return config.load(path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nfq-sttcp", description="ST-TCP server fault tolerance for stock Linux.")
    ap.add_argument("--version", action="version", version="nfq-sttcp " + __version__)
    ap.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    for role in ("primary", "backup"):
        p = sub.add_parser(role, help="run the %s daemon" % role)
        p.add_argument("--config", required=True, help="TOML config file")
        p.add_argument("--insecure-no-auth", action="store_true",
                       help="run without sync.key_file: anyone on the sync link can forge messages")
        p.add_argument("--control-socket", help="control socket path (default: control_socket_dir/ROLE.sock)")

    p = sub.add_parser("rules", help="apply, remove or show a role's iptables rules by hand")
    p.add_argument("action", choices=("apply", "remove", "show", "render"))
    p.add_argument("--role", choices=("primary", "backup"), required=True)
    p.add_argument("--config", required=True)

    p = sub.add_parser("config", help="check a config file")
    p.add_argument("action", choices=("check",))
    p.add_argument("--config", required=True)

    p = sub.add_parser("cleanup", help="remove every nfq-sttcp chain left behind (after kill -9)")
    p.add_argument("--config", help="config whose chain_prefix to clean (default prefix STTCP)")

    p = sub.add_parser("status", help="ask a running daemon for its status (exit 0 healthy, 1 degraded, 2 down)")
    p.add_argument("--config", required=True)
    p.add_argument("--role", choices=("primary", "backup"), help="whose control socket (default: the daemon in this network "
                   "namespace, else whichever answers)")
    p.add_argument("--control-socket", help="a control socket path (overrides --role)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("replay", help="replay the client side of a pcap against a server and check its answers")
    p.add_argument("capture", help="a pcap file (tcpdump -s 0 -w FILE)")
    p.add_argument("--target", required=True, help="HOST:PORT, or HOST to keep each connection's server port")
    p.add_argument("--speed", type=float, default=1.0, help="time scale: 2 replays twice as fast (default 1)")
    p.add_argument("--crash-primary-at", metavar="T",
                   help="crash the lab's primary at T seconds (2.5, 2.5s) or bytes moved (10MB, 64KB); implies --lab")
    p.add_argument("--lab", action="store_true", help="replay from the lab's client namespace")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to allow beyond the capture's length")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("doctor", help="preflight check of this host, and with --peer of the pair (exit 1 on a problem)")
    p.add_argument("--config", required=True)
    p.add_argument("--role", choices=("primary", "backup"), help="default: the role whose sync address is here")
    p.add_argument("--peer", action="store_true", help="also compare with the doctor run on the peer (over the sync "
                   "link, UDP sync.port + 1): start it there within --wait seconds")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the peer's doctor (default 30)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="ST-TCP against plain TCP in the lab: throughput, latency, connections, "
                       "failover gaps (table, JSON, PNG plots)")
    p.add_argument("--quick", action="store_true", help="small sizes and 3 crashes per workload (minutes, not half an hour)")
    p.add_argument("--out", default="bench-out", help="directory for bench.json and the plots (default bench-out)")
    p.add_argument("--handlers", action="store_true",
                   help="only the daemons' own code per packet, without the kernel: seconds, no lab, no root")

    p = sub.add_parser("notify", help="keepalived's notify hook: tell the local daemon its VRRP state")
    p.add_argument("--config", required=True)
    p.add_argument("--control-socket", help="the daemon's control socket (default: try both roles')")
    p.add_argument("vrrp_type", metavar="TYPE", help="INSTANCE or GROUP (as keepalived passes it)")
    p.add_argument("vrrp_name", metavar="NAME")
    p.add_argument("vrrp_state", metavar="STATE", help="MASTER, BACKUP, FAULT or STOP")
    p.add_argument("priority", nargs="?", help="(passed by keepalived, unused)")

    p = sub.add_parser("switchover", help="planned handover: the backup takes over now (run where the service runs)")
    p.add_argument("--config", required=True)
    p.add_argument("--control-socket", help="the serving daemon's control socket (default: try both roles')")

    lab = sub.add_parser("lab", help="the namespace lab")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True, metavar="LABCOMMAND")
    p = lsub.add_parser("up", help="create the lab and start apps and daemons")
    p.add_argument("--app", help="command line of the application to run on both servers")
    p.add_argument("--port", type=int, action="append", help="a port to protect (repeatable; with --app)")
    p.add_argument("--heartbeat-ms", type=int, default=50)
    p.add_argument("--missed", type=int, default=3)
    p.add_argument("--defer-backup", action="store_true", help="start the backup daemon later (lab start-backup)")
    p.add_argument("--no-daemons", action="store_true", help="network and applications only: start the daemons by hand")
    p.add_argument("--keepalived", action="store_true",
                   help="keepalived's VRRP owns the VIP (vip_owner = \"keepalived\"); needs the keepalived package")
    p.add_argument("--fast-path", action="store_true",
                   help="the primary's kernel fast path (tuning.fast_path; its connections go without divergence detection)")
    p.add_argument("--max-lag-kb", type=int, default=256,
                   help="tuning.max_backup_lag_kb: how far the primary's output may run ahead of the backup's "
                        "(0 = unbounded; default %(default)s)")
    p.add_argument("--max-lag-ms", type=int, default=Config.max_backup_lag_ms,
                   help="tuning.max_backup_lag_ms: ... or as much as the backup wrote in this long at its latest "
                        "pace, whichever is more (0 = the byte bound alone; default %(default)s)")
    p.add_argument("--no-fast-inbound", action="store_true",
                   help="tuning.fast_inbound = false: the backup's daemon maps every client segment itself")
    lsub.add_parser("down", help="remove everything the lab made")
    lsub.add_parser("start-backup", help="start the backup daemon deferred by 'lab up --defer-backup'")
    lsub.add_parser("switchover", help="planned handover to the backup")
    p = lsub.add_parser("matrix", help="the fault matrix: crash points x workloads x connections x loss")
    p.add_argument("--points", default="syn,synack,mid,client_fin,server_fin", help="comma-separated crash points")
    p.add_argument("--workloads", default="echo,down,up,rr,banner", help="comma-separated workloads")
    p.add_argument("--conns", default="1,100", help="comma-separated connection counts")
    p.add_argument("--loss", default="0,1,5", help="comma-separated loss percentages (clone path and sync link)")
    p.add_argument("--json", metavar="FILE", help="also write the cells as JSON")
    p.add_argument("--keep-failures", metavar="DIR", default="matrix-failures",
                   help="where a failed cell's logs, client capture and report are kept (default: %(default)s)")
    p.add_argument("--fast-path", action="store_true", help="every cell's lab with the primary's kernel fast path")
    p = lsub.add_parser("rejoin", help="restart a crashed server as the backup of the one that took over")
    p.add_argument("host", choices=("primary", "backup"))
    p = lsub.add_parser("status", help="VIP owner, watchdog state, connections")
    p.add_argument("--json", action="store_true")
    p = lsub.add_parser("crash", help="simulate a host crash")
    p.add_argument("host", choices=("primary", "backup"))
    p = lsub.add_parser("place", help="put each server host's processes on CPUs of its own, as on two machines")
    p.add_argument("--shared", action="store_true", help="give them again every CPU this command may use")
    p = lsub.add_parser("exec", help="run a command in a lab host: lab exec HOST -- CMD ARGS...")
    p.add_argument("host", choices=("client", "primary", "backup", "lan", "sync"))
    p.add_argument("argv", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="bring up the lab, run every kind of traffic across a primary crash")
    p.add_argument("--download-mb", type=int, default=50)
    p.add_argument("--upload-mb", type=int, default=50)
    p.add_argument("--rate-mbit", type=int, default=None,
                   help="pace of each bulk transfer, default 200 (0: unpaced, which saturates a 2-vCPU machine)")

    sub.add_parser("testapp", help="the built-in deterministic test server", add_help=False)
    sub.add_parser("traffic", help="test clients (used by the demo and the tests)", add_help=False)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Pass-through tools keep their own argument parsers.
    for i, a in enumerate(argv):
        if a in ("testapp", "traffic"):
            if a == "testapp":
                from . import testapp
                return testapp.main(argv[i + 1:])
            from . import traffic
            return traffic.main(argv[i + 1:])
        if not a.startswith("-"):
            break
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.verbose)
    try:
        return _dispatch(args)
    except ConfigError as e:
        return _die("config error: %s" % e)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from .firewall import FirewallError

    if args.cmd in ("primary", "backup"):
        from .driver import Daemon, DaemonError
        cfg = _load(args.config)
        if cfg.sync_key_file is None and not args.insecure_no_auth:
            return _die("config error: no sync.key_file: the sync link would be unauthenticated. Create a key "
                        "(head -c 32 /dev/urandom | base64 > KEYFILE; chmod 600 KEYFILE), set sync.key_file, "
                        "or pass --insecure-no-auth")
        try:
            return Daemon(cfg, args.cmd, control_path=args.control_socket).run()
        except DaemonError as e:
            return _die(str(e), e.exit_code)
        except FirewallError as e:
            return _die(str(e), 1)
        except Exception as e:  # a bug: one clear line, the traceback with -v
            if args.verbose:
                import traceback
                traceback.print_exc()
            return _die("%s daemon failed: %s: %s" % (args.cmd, type(e).__name__, e), 1)
    if args.cmd == "rules":
        from . import firewall, rules
        cfg = _load(args.config)
        if args.action == "render":
            sys.stdout.write(rules.render(cfg, args.role))
            return 0
        if os.geteuid() != 0:
            return _die("rules %s needs root" % args.action, 1)
        try:
            if args.action == "apply":
                firewall.apply(cfg, args.role)
                print("applied %s rules" % args.role)
            elif args.action == "remove":
                errs = firewall.remove(cfg, args.role)
                if args.role == "backup":
                    firewall.tc_detach_everywhere((cfg.control_socket_dir,))  # (what a killed daemon left)
                print("removed %s rules%s" % (args.role, "" if not errs else " (with errors: %s)" % "; ".join(errs)))
            else:
                print(firewall.show(cfg) or "(no nfq-sttcp rules)")
        except FirewallError as e:
            return _die(str(e), 1)
        return 0
    if args.cmd == "config":
        cfg = _load(args.config)
        cfg.read_key()
        print("%s: valid (VIP %s, ports %s, detection %d ms, sync %s)"
              % (args.config, cfg.vip, ",".join(map(str, cfg.ports)), cfg.detection_ms,
                 "authenticated" if cfg.sync_key_file else "UNAUTHENTICATED"))
        return 0
    if args.cmd == "cleanup":
        from . import firewall, lab
        cfg = _load(args.config) if args.config else lab.lab_config()
        if os.geteuid() != 0:
            return _die("cleanup needs root", 1)
        errs = firewall.remove_all(cfg)
        # (Without a config file: the lab's directory and the default one.)
        firewall.tc_detach_everywhere((cfg.control_socket_dir,) if args.config else
                                      (cfg.control_socket_dir, Config.control_socket_dir))
        print("removed chains %s-*%s" % (cfg.chain_prefix, "" if not errs else " (errors: %s)" % "; ".join(errs)))
        return 0
    if args.cmd == "status":
        return _daemon_status(args)
    if args.cmd == "notify":
        return _notify(args)
    if args.cmd == "doctor":
        return _doctor(args)
    if args.cmd == "bench":
        return _bench(args)
    if args.cmd == "switchover":
        return _switchover(args)
    if args.cmd == "replay":
        return _replay(args)
    if args.cmd == "lab":
        return _lab(args)
    if args.cmd == "demo":
        from . import demo, lab
        if args.rate_mbit is not None and args.rate_mbit < 0:
            return _die("--rate-mbit must be 0 (unpaced) or more", 2)
        rate = demo.DEFAULT_RATE_MBIT if args.rate_mbit is None else args.rate_mbit
        try:
            return demo.run(download_mb=args.download_mb, upload_mb=args.upload_mb, rate_mbit=rate)
        except lab.LabError as e:
            return _die(str(e), 1)
    return _die("unknown command")


def _daemon_status(args: argparse.Namespace) -> int:
    """Exit 0 healthy, 1 degraded, 2 down (no daemon answers, or it failed)."""
    from . import control
    cfg = _load(args.config)
    paths = [args.control_socket] if args.control_socket else \
        [cfg.control_socket(r) for r in ([args.role] if args.role else ["primary", "backup"])]
    try:
        _path, st = control.local_answer(paths)
    except OSError as e:
        if args.json:
            print(json.dumps({"health": control.DOWN, "why": ["no daemon answers"], "errors": str(e)}))
        print("down: no daemon answers (%s)" % e, file=sys.stderr)
        return control.EXIT_CODES[control.DOWN]
    level, why = control.health(st)
    print(json.dumps(dict(st, health=level, why=why), indent=2) if args.json else _format_daemon(st, level, why))
    return control.EXIT_CODES[level]


def _bench(args: argparse.Namespace) -> int:
    from . import bench, lab
    if args.handlers:
        from . import handlercost
        res = handlercost.measure()
        print("\n".join([handlercost.line(res)] + handlercost.rounds_lines(res)))
        return 0
    if os.geteuid() != 0:
        return _die("bench needs root: it builds the namespace lab", 1)
    if lab.namespaces():
        return _die("a lab is up: 'nfq-sttcp lab down' first (the bench builds its own)", 1)
    try:
        res = bench.run(quick=args.quick, out_dir=args.out)
    except (lab.LabError, RuntimeError) as e:
        lab.down(quiet=True)
        return _die("bench: %s" % e, 1)
    print()
    print(bench.table(res))
    try:
        made = bench.plots(res, args.out)
    except ImportError:
        made = []
        print("(no plots: matplotlib is not installed; 'make bench' installs it)")
    print("\nbench done in %.0f s: %s%s" % (res["seconds"], os.path.join(args.out, "bench.json"),
                                        "".join(", " + m for m in made)))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor
    cfg = _load(args.config)
    role = args.role
    local = doctor.local_addresses()
    if role is None:
        role = "primary" if cfg.primary_sync in local else "backup" if cfg.backup_sync in local else None
        if role is None:
            return _die("neither sync address (%s, %s) is on this host: name the role with --role"
                        % (cfg.primary_sync, cfg.backup_sync), 1)
    facts = doctor.gather(cfg, role, local)
    findings = [("host", f) for f in doctor.check_host(facts, cfg)]
    if args.peer:
        try:
            theirs = doctor.exchange(cfg, role, facts, args.wait)
        except (OSError, ConfigError) as e:
            return _die("doctor --peer: %s" % e, 1)
        if theirs is None:
            findings.append(("pair", doctor.Finding(doctor.FAIL, "peer", "no doctor answered from %s within %g s"
                                                    % (cfg.peer_addresses(role)[0], args.wait),
                                                    "run 'nfq-sttcp doctor --peer' on the peer too; check the "
                                                    "sync link and the key")))
        else:
            findings += [("pair", f) for f in doctor.compare(facts, theirs)]
    bad = [f for _w, f in findings if f.level == doctor.FAIL]
    if args.json:
        print(json.dumps({"role": role, "ok": not bad, "findings": [dict(f.__dict__, scope=w) for w, f in findings]},
                         indent=2))
    else:
        for where, f in findings:
            line = "%-4s %-4s %s" % (f.level.upper(), where, f.what)
            if f.detail:
                line += ": " + f.detail
            print(line)
            if f.fix and f.level != doctor.OK:
                print("          fix: " + f.fix)
        print("%s: %d problem(s), %d warning(s)" % (role, len(bad),
                                                    sum(1 for _w, f in findings if f.level == doctor.WARN)))
    return 1 if bad else 0


def _notify(args: argparse.Namespace) -> int:
    """keepalived runs this on every VRRP state change (notify script)."""
    from . import control
    cfg = _load(args.config)
    paths = [args.control_socket] if args.control_socket else [cfg.control_socket(r) for r in ("backup", "primary")]
    try:
        _path, reply = control.local_answer(paths, "notify %s" % args.vrrp_state, timeout=5.0)
    except OSError as e:
        return _die("notify: no daemon answers (%s)" % e, 1)
    if "error" in reply:
        return _die("notify %s %s: %s" % (args.vrrp_name, args.vrrp_state, reply["error"]), 1)
    print("notify %s %s: %s" % (args.vrrp_name, args.vrrp_state, reply.get("action")))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from . import replay
    from .pcap import PcapError

    host, _, port_s = args.target.rpartition(":") if ":" in args.target else (args.target, "", "")
    try:
        port = int(port_s) if port_s else None
        crash_at = replay.parse_crash_point(args.crash_primary_at) if args.crash_primary_at else None
        if port is not None and not 0 < port < 65536:
            raise ValueError("--target: port %d out of range" % port)
        if not 0 < args.speed < float("inf"):  # (also refuses nan)
            raise ValueError("--speed must be a positive number")
    except ValueError as e:
        return _die(str(e))
    try:
        ex = replay.extract(args.capture)
    except PcapError as e:
        return _die("cannot replay: %s" % e)
    for note in ex.notes:
        print("note: %s" % note, file=sys.stderr)
    crash = None
    if crash_at is not None or args.lab:
        from . import lab
        if os.geteuid() != 0 or lab.NS_CLIENT not in lab.namespaces():
            return _die("--lab and --crash-primary-at need root and a lab that is up ('nfq-sttcp lab up')", 1)
        replay.enter_netns(lab.NS_CLIENT)
        crash = lambda: lab.crash("primary")[0]  # noqa: E731
    print("replaying %d connection(s), %d client bytes, to %s at speed %g%s" % (
        len(ex.streams), sum(s.client_bytes for s in ex.streams), args.target, args.speed,
        "" if crash_at is None else ", crashing the primary at %s" % args.crash_primary_at), file=sys.stderr)
    report = replay.replay(ex.streams, host, port, args.speed, crash_at, crash, args.timeout,
                           progress_cb=lambda m: print("  " + m, file=sys.stderr))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("%-44s %10s %10s %10s %9s %8s  %s" % ("connection", "sent", "received", "expected",
                                                   "mismatch", "gap ms", "result"))
        for c in report["connections"]:
            print("%-44s %10d %10d %10d %9s %8s  %s" % (
                c["connection"], c["sent"], c["received"], c["expected"],
                "-" if c["first_mismatch"] is None else c["first_mismatch"],
                "-" if c["failover_gap_ms"] is None else c["failover_gap_ms"],
                "ok" if c["ok"] else "FAILED" + (": " + c["error"] if c["error"] else "")))
        n_ok = sum(1 for c in report["connections"] if c["ok"])
        print("%d of %d connections byte-exact%s" % (n_ok, len(report["connections"]),
                                                      "; the primary was crashed" if report["crashed"] else ""))
    if report["crash_requested"] and not report["crashed"]:
        # A failover test whose crash never came proves nothing: say so, and fail.
        print("the crash point %s was never reached: the replay was over after %.2f s and %d bytes moved; "
              "nothing was crashed" % (args.crash_primary_at, report["seconds"], report["bytes_moved"]),
              file=sys.stderr)
        return 1
    return 0 if report["ok"] else 1


def _matrix(args: argparse.Namespace) -> int:
    from . import lab, matrix

    def names(text: str, known: tuple, what: str) -> list[str]:
        got = [x for x in text.split(",") if x]
        bad = [x for x in got if x not in known]
        if bad or not got:
            raise ValueError("%s: unknown %s (known: %s)" % (what, ", ".join(bad) or "none given", ", ".join(known)))
        return got

    try:
        points = names(args.points, matrix.POINTS, "--points")
        workloads = names(args.workloads, matrix.WORKLOADS, "--workloads")
        conns = [int(x) for x in args.conns.split(",") if x]
        losses = [int(x) for x in args.loss.split(",") if x]
        if not conns or any(not 1 <= n <= 500 for n in conns) or any(not 0 <= x < 100 for x in losses):
            raise ValueError("--conns must be 1..500 and --loss 0..99")
    except ValueError as e:
        return _die(str(e))
    if lab.namespaces():
        return _die("a lab is up: the matrix brings up its own ('nfq-sttcp lab down' first)", 1)
    n = len(points) * len(workloads) * len(conns) * len(losses)
    print("fault matrix: %d cells, each a lab brought up, loaded and crashed (about 5 s a cell)" % n, flush=True)
    cells = matrix.run(points, workloads, conns, losses, progress=lambda m: print(m, flush=True),
                       keep_dir=args.keep_failures, fast_path=args.fast_path)
    print(matrix.table(cells))
    if args.json:
        with open(args.json, "w") as f:
            f.write(matrix.to_json(cells))
    return 0 if all(c.ok for c in cells) else 1


def _switchover(args: argparse.Namespace) -> int:
    from . import control
    cfg = _load(args.config)
    paths = [args.control_socket] if args.control_socket else [cfg.control_socket(r) for r in ("primary", "backup")]
    denied = []
    for path in paths:
        try:
            st = control.request(path)
        except PermissionError:
            denied.append(path)
            continue
        except (OSError, ValueError):
            continue
        if control.serves(st):
            try:
                r = control.switchover(path)
            except (OSError, ValueError) as e:
                return _die("switchover: the daemon at %s stopped answering (%s); see 'nfq-sttcp status'"
                            % (path, e), 1)
            if not r["done"]:
                return _die("switchover failed: %s" % r.get("error"), 1)
            print("switchover done: the backup serves; this host's replies stay fenced until "
                  "'nfq-sttcp rules remove --role %s'" % st["role"])
            return 0
    if denied:
        return _die("switchover needs root: the control socket %s is the daemon's own (mode 0600)"
                    % ", ".join(denied), 1)
    return _die("no daemon serving the VIP answers here (%s): run switchover on the serving host"
                % ", ".join(paths), 3)


def _format_daemon(st: dict, level: str = "", why: tuple = ()) -> str:
    beats = st.get("heartbeats", {})
    lines = ["%s%s: %s%s" % (st["role"], " (serving as primary)" if st.get("serving_as") == "primary" else "",
                             level.upper() or st["state"], "" if not why else ": " + "; ".join(why)),
             "  state %s, peer %s%s, last heartbeat %s ms ago, heartbeat RTT %s ms" % (
                 st["state"], st.get("peer_state") or "never heard",
                 " (backup %s)" % st["backup"] if "backup" in st else "",
                 st.get("last_heartbeat_ms_ago"), beats.get("rtt_ms", "-"))]
    if "failover" in st:
        f = st["failover"]
        lines.append("  failover (%s): detection %s ms, takeover %s ms" % (f.get("reason"), f["detection_ms"],
                                                                          f["takeover_ms"]))
    if "fast_path" in st:
        fp = st["fast_path"]
        lines.append("  fast path: %d connections in the kernel's map, %d segments sent by it (as read back so far)"
                     % (fp["connections"], fp["packets"]))
    if "fast_inbound" in st:
        fi = st["fast_inbound"]
        lines.append("  inbound in the kernel (%s): %d connections in its map, %d client segments mapped by it "
                     "(as read back so far)" % (fi["interface"], fi["connections"], fi["packets"]))
    conns = st.get("connections", [])
    if conns:
        lines.append("  %-44s %-9s %10s %10s %11s %11s  %s" % ("connection", "protected", "lag B", "held B",
                                                             "delta seq", "delta ts", "why not"))
    for c in conns:
        lag = c.get("behind_bytes", c.get("backup_behind_bytes"))
        lines.append("  %-44s %-9s %10s %10s %11s %11s  %s" % (
            c["conn"], "yes" if c["protected"] else ("closed" if c.get("closed") else "NO"),
            "-" if lag is None else lag, c.get("held_bytes", "-"),
            "-" if c.get("delta_seq") is None else c["delta_seq"], "-" if c.get("delta_ts") is None else c["delta_ts"],
            "" if c["protected"] else ("closed, kept a while" if c.get("closed") else c["reason"])))
    return "\n".join(lines)


def _lab(args: argparse.Namespace) -> int:
    from . import lab

    try:
        if args.lab_cmd == "up":
            if args.port and not args.app:
                return _die("--port goes with --app (the built-in app uses 7000-7004)")
            lab.up(app=args.app, ports=tuple(args.port) if args.port else None, interval_ms=args.heartbeat_ms,
                   missed=args.missed, start_backup=not args.defer_backup, start_daemons=not args.no_daemons,
                   keepalived=args.keepalived, fast_path=args.fast_path, max_lag_kb=args.max_lag_kb,
                   max_lag_ms=args.max_lag_ms, fast_inbound=not args.no_fast_inbound)
            return 0
        if args.lab_cmd == "down":
            lab.down()
            return 0
        if args.lab_cmd == "start-backup":
            lab.start_backup_daemon()
            return 0
        if args.lab_cmd == "matrix":
            return _matrix(args)
        if args.lab_cmd == "switchover":
            host, _t, _w = lab.switchover()
            print("switchover done: %s serves" % host)
            return 0
        if args.lab_cmd == "rejoin":
            lab.rejoin(args.host)
            return 0
        if args.lab_cmd == "crash":
            lab.crash(args.host)
            print("crashed %s: links down, processes killed" % args.host)
            return 0
        if args.lab_cmd == "place":
            placed = lab.place_hosts(separate=not args.shared)
            print(", ".join("%s on CPU %s" % (h, ",".join(map(str, c))) for h, c in placed.items()))
            return 0
        if args.lab_cmd == "exec":
            argv = args.argv[1:] if args.argv and args.argv[0] == "--" else args.argv
            if not argv:
                return _die("lab exec HOST -- CMD ARGS...")
            return lab.exec_in(args.host, argv)
        if args.lab_cmd == "status":
            st = lab.status()
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                print("namespaces: %s" % (", ".join(st["namespaces"]) or "none"))
                owners = st["vip_owner"]
                print("VIP %s owned by: %s" % (st["vip"], ", ".join(owners) or "nobody"))
                for role in ("primary", "backup"):
                    d = st["daemons"][role]
                    if "role" in d:
                        from . import control

                        level, why = control.health(d)  # (said only when not healthy)
                        print(_format_daemon(d, "" if level == control.HEALTHY else level, why))
                    else:
                        print("%s: down (%s)" % (role, d.get("error")))
            return 0
    except lab.LabError as e:
        return _die(str(e), 1)
    return _die("unknown lab command")
