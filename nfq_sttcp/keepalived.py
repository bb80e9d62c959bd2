"""keepalived.conf for each role, when VRRP owns the VIP (``vip_owner =
"keepalived"``). Pure: the lab writes these, and ``vagrant/keepalived/``
holds the rendered samples for the two-VM lab.

Both instances start as BACKUP with ``nopreempt``: the higher priority (the
primary) wins the first election, and a primary host that comes back after a
failover does not grab the VIP back from the host that now serves (it
rejoins as the backup, see the runbook). Adverts are unicast over the LAN,
VRRPv3, so the interval can be below a second.
"""

from __future__ import annotations

from .config import Config

VRID = 77
# The notify command in the samples under vagrant/keepalived/ (the VM layout).
SAMPLE_NOTIFY = "/opt/nfq-sttcp/.venv/bin/nfq-sttcp notify --config /etc/nfq-sttcp/config.toml"
PRIORITY = {"primary": 150, "backup": 100}


def render(cfg: Config, role: str, notify: str, advert_ms: int = 50) -> str:
    """``notify``: the command keepalived runs on every state change, for
    example ``/usr/local/bin/nfq-sttcp notify --config /etc/nfq-sttcp/sttcp.toml``
    (keepalived appends TYPE NAME STATE PRIORITY)."""
    if role not in PRIORITY:
        raise ValueError("role must be primary or backup")
    if not (cfg.primary_lan and cfg.backup_lan):
        raise ValueError("keepalived needs both LAN addresses in the config ([lan] primary and backup)")
    if not 10 <= advert_ms <= 40950 or advert_ms % 10:
        raise ValueError("advert_ms must be a multiple of 10 in 10..40950 (VRRPv3 centiseconds)")
    me, peer = (cfg.primary_lan, cfg.backup_lan) if role == "primary" else (cfg.backup_lan, cfg.primary_lan)
    return """# nfq-sttcp: keepalived for the %(role)s (vip_owner = "keepalived")
global_defs {
    router_id sttcp_%(role)s
    vrrp_version 3
    script_user root
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 3
}

vrrp_instance STTCP {
    state BACKUP
    nopreempt
    interface %(iface)s
    virtual_router_id %(vrid)d
    priority %(prio)d
    advert_int %(advert)s
    unicast_src_ip %(me)s
    unicast_peer {
        %(peer)s
    }
    virtual_ipaddress {
        %(vip)s/%(prefix)d dev %(iface)s
    }
    notify "%(notify)s"
}
""" % {"role": role, "iface": cfg.lan_interface, "vrid": VRID, "prio": PRIORITY[role],
       "advert": "%g" % (advert_ms / 1000), "me": me, "peer": peer, "vip": cfg.vip, "prefix": cfg.lan_prefix,
       "notify": notify}
