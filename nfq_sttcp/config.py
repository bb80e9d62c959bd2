"""One typed, validated configuration for both roles (a TOML file).

The same file serves the primary and the backup; the role comes from the
command line. Every mistake is a ConfigError with a message naming the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    pass


_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_CHAIN = re.compile(r"^[A-Z][A-Z0-9_-]{0,15}$")
_KEY_FILE_MAX = 4096  # a sync key is tens of bytes; more is the wrong file


VIP_OWNERS = ("builtin", "keepalived")


# The most a lag bound that follows the backup's pace allows (seqmath
# compares positions less than 2**31 apart).
MAX_PACED_LAG = 64 << 20


@dataclass(frozen=True)
class Config:
    vip: str
    ports: tuple[int, ...]
    lan_interface: str
    primary_sync: str
    backup_sync: str
    lan_prefix: int = 24
    sync_port: int = 7788
    sync_key_file: Optional[str] = None
    primary_lan: Optional[str] = None  # second heartbeat path, over the LAN
    backup_lan: Optional[str] = None
    heartbeat_interval_ms: int = 50
    heartbeat_missed: int = 3
    # Patience with a silent peer daemon whose host may be alive: the primary
    # then stops clamping and serves unprotected; a backup whose primary host
    # still answers ICMP goes orphaned. Both unprotect every open connection
    # for good, so this outlasts the detection time: under load a daemon's
    # loop can miss 150-300 ms of beats and live (measured at 100 connections
    # on 2 vCPUs). A host that stops answering is still taken over at the
    # detection time.
    daemon_lost_ms: int = 600
    queue_primary_out: int = 11
    queue_backup_in: int = 12
    queue_backup_out: int = 13
    queue_max_len: int = 16384
    queue_gso: bool = True  # whole GSO packets, 64 KB copies (nfqueue.py)
    mark: int = 0x5717
    chain_prefix: str = "STTCP"
    ts_margin_ms: int = 0
    max_backup_lag_kb: int = 256
    # ... or as much as the backup wrote in this long at its latest pace,
    # whichever is more (primary.PrimaryCore.lag_limit); 0 = bytes only.
    max_backup_lag_ms: int = 25
    # The primary's kernel fast path (fastpath.py): in-order data segments
    # within the backup's limits leave without a trip through the queue.
    # Its connections go without divergence detection (the primary tells the
    # backup so in each ISN message); it matters only on the serving primary.
    fast_path: bool = False
    # The backup's kernel path for client segments (fastin.py): a tc program
    # on the interface the clones arrive on maps those whose mapping the
    # daemon already knows (an upload's, mostly), without the queue. It
    # changes nothing the daemon would not; where it cannot run (no tc, a
    # link that is not Ethernet), the daemon warns and maps them all itself.
    fast_inbound: bool = True
    lan_snoop: bool = True
    metrics_port: int = 0  # Prometheus endpoint; 0 = none
    # Who owns the VIP: "builtin" (our heartbeats and watchdog move it) or
    # "keepalived" (VRRP moves it; its notify script tells us, see notify).
    vip_owner: str = "builtin"
    metrics_address: str = "127.0.0.1"
    # The backup learns of a connection only from the clone of the client's
    # SYN; when every clone is lost, only the client's own SYN retransmissions
    # (a Linux client: 1 s apart, four times) try again. 4.5 s lets five
    # through before the SYN-ACK goes out unprotected. With 3 s (three SYNs),
    # 3 of about 13,000 connections of the fault matrix at 5 % random loss on
    # the sync link lost all three clones (the backup's interface saw them
    # come in; the loss rule behind it took them) and could not be carried.
    synack_hold_ms: int = 4500
    handshake_hold_ms: int = 3000
    control_socket_dir: str = "/run/nfq-sttcp"
    # Survives a reboot (not /run): this host's last epoch, so that a daemon
    # restarted with its clock set back still starts a later life.
    state_dir: str = "/var/lib/nfq-sttcp"
    garp_schedule_ms: tuple[int, ...] = (0, 100, 300, 600, 1100, 2000)
    source: str = field(default="<defaults>", compare=False)

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_interval_ms / 1000.0

    @property
    def detection_ms(self) -> int:
        return self.heartbeat_interval_ms * self.heartbeat_missed

    @property
    def client_ack_ahead(self) -> int:
        """How far beyond the backup's own output a client ack may lie: the
        primary's lag bound (primary.PrimaryCore.lag_limit) and some slack;
        more is a forgery or a corruption."""
        if not self.max_backup_lag_kb:
            return 1 << 30
        lag = self.max_backup_lag_kb * 1024
        if self.max_backup_lag_ms:
            lag = max(lag, MAX_PACED_LAG)
        return lag + (4 << 20)

    def control_socket(self, role: str) -> str:
        return os.path.join(self.control_socket_dir, "%s.sock" % role)

    def peer_addresses(self, role: str) -> list[str]:
        """Where this role sends heartbeats: the sync link, then the LAN path."""
        if role == "primary":
            return [a for a in (self.backup_sync, self.backup_lan) if a]
        return [a for a in (self.primary_sync, self.primary_lan) if a]

    def own_addresses(self, role: str) -> list[str]:
        if role == "primary":
            return [a for a in (self.primary_sync, self.primary_lan) if a]
        return [a for a in (self.backup_sync, self.backup_lan) if a]

    def swapped(self) -> "Config":
        """The same pair with the roles' addresses exchanged: the view of a
        host that serves in the other role than the file names it for (an old
        primary rejoining as the backup, an old backup now serving)."""
        return replace(self, primary_sync=self.backup_sync, backup_sync=self.primary_sync,
                                   primary_lan=self.backup_lan, backup_lan=self.primary_lan)

    def read_key(self) -> Optional[bytes]:
        if not self.sync_key_file:
            return None
        try:
            # Checked before open(): a FIFO blocks the open itself, and a device
            # (/dev/urandom) would be read forever.
            if not stat.S_ISREG(os.stat(self.sync_key_file).st_mode):
                raise ConfigError("sync.key_file: %s is not a regular file (write the key into one: "
                                  "head -c 32 /dev/urandom | base64 > FILE)" % self.sync_key_file)
            with open(self.sync_key_file, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                key = f.read(_KEY_FILE_MAX + 1).strip()
        except OSError as e:
            hint = " (the key is root's: run as root)" if isinstance(e, PermissionError) and os.geteuid() else ""
            raise ConfigError("sync.key_file: cannot read %s: %s%s" % (self.sync_key_file, e.strerror, hint)) from None
        if mode & 0o077:
            raise ConfigError("sync.key_file: %s is readable by group or others: chmod 600 %s"
                              % (self.sync_key_file, self.sync_key_file))
        if len(key) > _KEY_FILE_MAX:
            raise ConfigError("sync.key_file: %s is larger than %d bytes; is it the key?"
                              % (self.sync_key_file, _KEY_FILE_MAX))
        if len(key) < 16:
            raise ConfigError("sync.key_file: key in %s is shorter than 16 bytes" % self.sync_key_file)
        return key


# TOML layout: section -> {toml key: Config field}
_LAYOUT: dict[str, dict[str, str]] = {
    "": {"vip": "vip", "ports": "ports", "lan_interface": "lan_interface", "lan_prefix": "lan_prefix",
         "mark": "mark", "chain_prefix": "chain_prefix", "control_socket_dir": "control_socket_dir",
         "state_dir": "state_dir",
         "lan_snoop": "lan_snoop", "metrics_port": "metrics_port", "metrics_address": "metrics_address",
         "vip_owner": "vip_owner"},
    "sync": {"primary": "primary_sync", "backup": "backup_sync", "port": "sync_port",
             "key_file": "sync_key_file"},
    "lan": {"primary": "primary_lan", "backup": "backup_lan"},
    "heartbeat": {"interval_ms": "heartbeat_interval_ms", "missed": "heartbeat_missed",
                  "daemon_lost_ms": "daemon_lost_ms"},
    "queues": {"primary_out": "queue_primary_out", "backup_in": "queue_backup_in",
               "backup_out": "queue_backup_out", "max_len": "queue_max_len", "gso": "queue_gso"},
    "tuning": {"ts_margin_ms": "ts_margin_ms", "max_backup_lag_kb": "max_backup_lag_kb",
               "max_backup_lag_ms": "max_backup_lag_ms", "synack_hold_ms": "synack_hold_ms",
               "handshake_hold_ms": "handshake_hold_ms", "garp_schedule_ms": "garp_schedule_ms",
               "fast_path": "fast_path", "fast_inbound": "fast_inbound"},
}
_REQUIRED = ("vip", "ports", "lan_interface", "primary_sync", "backup_sync")


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError("cannot read config %s: %s" % (path, e.strerror)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config %s is not valid TOML: %s" % (path, e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("config %s is not UTF-8 text (byte %d): is it the config file?" % (path, e.start)) from None
    return from_dict(raw, source=path)


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    values: dict[str, Any] = {}
    for key, val in raw.items():
        if isinstance(val, dict):
            if key not in _LAYOUT or key == "":
                raise ConfigError("unknown section [%s]" % key)
            for sub, v in val.items():
                if sub not in _LAYOUT[key]:
                    raise ConfigError("unknown key %s.%s (known: %s)" % (key, sub, ", ".join(_LAYOUT[key])))
                values[_LAYOUT[key][sub]] = v
        else:
            if key not in _LAYOUT[""]:
                raise ConfigError("unknown key %r (known top-level keys: %s; sections: %s)"
                                  % (key, ", ".join(_LAYOUT[""]), ", ".join(k for k in _LAYOUT if k)))
            values[_LAYOUT[""][key]] = val
    missing = [f for f in _REQUIRED if f not in values]
    if missing:
        names = {v: ("%s.%s" % (s, k) if s else k) for s, m in _LAYOUT.items() for k, v in m.items()}
        raise ConfigError("missing required key(s): %s" % ", ".join(names[m] for m in missing))
    types = {f.name: f.type for f in fields(Config)}
    for name, v in list(values.items()):
        t = str(types[name])
        if t.startswith("bool"):
            if not isinstance(v, bool):
                raise ConfigError("%s must be true or false, not %r" % (name, v))
        elif "tuple" in t:
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ConfigError("%s must be a list of integers" % name)
            values[name] = tuple(v)
        elif t.startswith("int"):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError("%s must be an integer, not %r" % (name, v))
        elif not isinstance(v, str):
            raise ConfigError("%s must be a string, not %r" % (name, v))
    cfg = Config(source=source, **values)
    validate(cfg)
    return cfg


def _ip(name: str, value: Optional[str]) -> Optional[ipaddress.IPv4Address]:
    if value is None:
        return None
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError("%s: %r is not an IPv4 address" % (name, value)) from None


def validate(cfg: Config) -> None:
    vip = _ip("vip", cfg.vip)
    psync, bsync = _ip("sync.primary", cfg.primary_sync), _ip("sync.backup", cfg.backup_sync)
    plan, blan = _ip("lan.primary", cfg.primary_lan), _ip("lan.backup", cfg.backup_lan)
    if not 1 <= cfg.lan_prefix <= 32:
        raise ConfigError("lan_prefix must be 1..32")
    if psync == bsync:
        raise ConfigError("sync.primary and sync.backup must differ")
    # One host's address given as the other's: the daemon holding it would
    # hear its own heartbeats as its peer's.
    for (na, a), (nb, b) in ((("lan.primary", plan), ("lan.backup", blan)),
                             (("sync.primary", psync), ("lan.backup", blan)),
                             (("lan.primary", plan), ("sync.backup", bsync))):
        if a is not None and a == b:
            raise ConfigError("%s and %s are both %s: each must be an address of its own host" % (na, nb, a))
    if vip in (psync, bsync, plan, blan):
        raise ConfigError("vip %s must not be a host address of either server" % cfg.vip)
    net = ipaddress.IPv4Network("%s/%d" % (cfg.vip, cfg.lan_prefix), strict=False)
    for name, a in (("lan.primary", plan), ("lan.backup", blan)):
        if a is not None and a not in net:
            raise ConfigError("%s %s is outside the VIP's LAN subnet %s" % (name, a, net))
    if (plan is None) != (blan is None):
        raise ConfigError("set both lan.primary and lan.backup for the LAN heartbeat path, or neither")
    if not cfg.ports:
        raise ConfigError("ports must name at least one TCP port")
    if len(set(cfg.ports)) != len(cfg.ports) or not all(1 <= p <= 65535 for p in cfg.ports):
        raise ConfigError("ports must be distinct integers in 1..65535")
    if cfg.vip_owner not in VIP_OWNERS:
        raise ConfigError("vip_owner must be one of %s" % ", ".join(repr(v) for v in VIP_OWNERS))
    if not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError("metrics_port must be in 0..65535 (0: no metrics endpoint)")
    try:
        ipaddress.ip_address(cfg.metrics_address)
    except ValueError:
        raise ConfigError("metrics_address %r is not an IP address" % cfg.metrics_address) from None
    if not 1 <= cfg.sync_port <= 65534:
        raise ConfigError("sync.port must be in 1..65534 (doctor --peer uses sync.port + 1)")
    if not _IFNAME.match(cfg.lan_interface):
        raise ConfigError("lan_interface %r is not a valid interface name" % cfg.lan_interface)
    if not 1 <= cfg.heartbeat_interval_ms <= 60000:
        raise ConfigError("heartbeat.interval_ms must be in 1..60000")
    if not 1 <= cfg.heartbeat_missed <= 100:
        raise ConfigError("heartbeat.missed must be in 1..100")
    if not cfg.heartbeat_interval_ms <= cfg.daemon_lost_ms <= 600000:
        raise ConfigError("heartbeat.daemon_lost_ms must be in interval_ms..600000")
    queues = (cfg.queue_primary_out, cfg.queue_backup_in, cfg.queue_backup_out)
    if not all(0 <= q <= 65535 for q in queues) or len(set(queues)) != 3:
        raise ConfigError("queues.primary_out, backup_in and backup_out must be distinct numbers in 0..65535")
    if not 64 <= cfg.queue_max_len <= 1 << 20:
        raise ConfigError("queues.max_len must be in 64..1048576")
    if not 0 < cfg.mark < 1 << 32:
        raise ConfigError("mark must be a non-zero 32-bit integer")
    if not _CHAIN.match(cfg.chain_prefix):
        raise ConfigError("chain_prefix must be 1-16 upper-case letters, digits, - or _")
    for name in ("ts_margin_ms", "synack_hold_ms", "handshake_hold_ms", "max_backup_lag_kb", "max_backup_lag_ms"):
        if not 0 <= getattr(cfg, name) <= 600000:
            raise ConfigError("tuning.%s must be in 0..600000" % name)
    if not cfg.garp_schedule_ms or any(t < 0 for t in cfg.garp_schedule_ms):
        raise ConfigError("tuning.garp_schedule_ms must be a non-empty list of non-negative delays")
    if not os.path.isabs(cfg.state_dir):
        raise ConfigError("state_dir must be an absolute path (it holds this host's last epoch), not %r"
                          % cfg.state_dir)
    if list(cfg.garp_schedule_ms) != sorted(cfg.garp_schedule_ms):
        # The takeover sends them in the order given, looking only at the next.
        raise ConfigError("tuning.garp_schedule_ms must be in increasing order (delays from the takeover)")
    if cfg.sync_key_file is not None:
        cfg.read_key()


def render_toml(cfg: Config) -> str:
    """The TOML text that loads back into ``cfg`` (used by the lab)."""
    lines: list[str] = []

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"%s"' % v
        if isinstance(v, tuple):
            return "[%s]" % ", ".join(str(x) for x in v)
        return str(v)

    for section, mapping in _LAYOUT.items():
        chunk = ["%s = %s" % (k, val(getattr(cfg, f))) for k, f in mapping.items()
                 if getattr(cfg, f) is not None]
        if not chunk:
            continue
        if section:
            lines.append("\n[%s]" % section)
        lines.extend(chunk)
    return "\n".join(lines) + "\n"
