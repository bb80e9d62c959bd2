#!/usr/bin/env bash
# Provision one nfq-sttcp host: provision.sh primary|backup|client
#
# Installs nfq-sttcp with the same bootstrap script as `make demo`/`make test`,
# sets the role's sysctls, writes /etc/nfq-sttcp/config.toml and the sync key,
# and installs and starts systemd units for the daemon and the sample
# deterministic application. Running it again changes nothing.
#
# Settings come from the environment (the Vagrantfile passes them):
#   STTCP_VIP STTCP_PORTS STTCP_LAN_PREFIX STTCP_PRIMARY_LAN STTCP_BACKUP_LAN
#   STTCP_PRIMARY_SYNC STTCP_BACKUP_SYNC
# STTCP_SRC (default /opt/nfq-sttcp) is the repository; STTCP_ETC (default
# /etc/nfq-sttcp) where the config goes; STTCP_RENDER_ONLY=1 writes the config
# and units under STTCP_ETC and does nothing else (used by the tests).
set -euo pipefail

role="${1:?usage: provision.sh primary|backup|client}"
SRC="${STTCP_SRC:-/opt/nfq-sttcp}"
ETC="${STTCP_ETC:-/etc/nfq-sttcp}"
UNITS="${STTCP_UNITS:-/etc/systemd/system}"
: "${STTCP_VIP:?}" "${STTCP_PORTS:?}" "${STTCP_PRIMARY_LAN:?}" "${STTCP_BACKUP_LAN:?}"
: "${STTCP_PRIMARY_SYNC:?}" "${STTCP_BACKUP_SYNC:?}"
PREFIX="${STTCP_LAN_PREFIX:-24}"

# The interface that holds a given address (names differ between providers).
iface_of() {
    ip -o -4 addr show | awk -v a="$1" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}'
}

write_if_changed() {  # write_if_changed FILE MODE < content
    local tmp
    tmp="$(mktemp)"
    cat > "$tmp"
    if [ -f "$1" ] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 1
    fi
    install -D -m "$2" "$tmp" "$1"
    rm -f "$tmp"
    return 0
}

render_config() {  # render_config LAN_IF
    cat <<CONF
# nfq-sttcp $role (written by vagrant/provision.sh)
vip = "$STTCP_VIP"
ports = [${STTCP_PORTS}]
lan_interface = "$1"
lan_prefix = $PREFIX
control_socket_dir = "/run/nfq-sttcp"

[sync]
primary = "$STTCP_PRIMARY_SYNC"
backup = "$STTCP_BACKUP_SYNC"
key_file = "$ETC/sync.key"

[lan]
primary = "$STTCP_PRIMARY_LAN"
backup = "$STTCP_BACKUP_LAN"
CONF
}

render_units() {
    local unit
    for unit in "$SRC"/vagrant/systemd/*.service.in; do
        sed -e "s|@SRC@|$SRC|g" -e "s|@ETC@|$ETC|g" -e "s|@VIP@|$STTCP_VIP|g" \
            -e "s|@PREFIX@|$PREFIX|g" -e "s|@LAN_IF@|$1|g" "$unit" \
            | write_if_changed "$UNITS/$(basename "${unit%.in}")" 0644 || true
    done
}

if [ "${STTCP_RENDER_ONLY:-0}" = 1 ]; then
    render_config "${STTCP_LAN_IF:-lan0}" | write_if_changed "$ETC/config.toml" 0644 || true
    render_units "${STTCP_LAN_IF:-lan0}"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "provision.sh: run as root" >&2; exit 1; }

if [ "$role" = client ]; then
    # The client needs nothing from nfq-sttcp: it is any TCP client.
    dpkg -s python3 >/dev/null 2>&1 || { apt-get update -q; apt-get install -y -q python3; }
    exit 0
fi

case "$role" in
    primary) other=backup ;;
    backup) other=primary ;;
    *) echo "provision.sh: role must be primary, backup or client" >&2; exit 2 ;;
esac
# Either LAN address: after a failover the old primary VM rejoins as the backup.
lan_if="$(iface_of "$STTCP_PRIMARY_LAN")"
[ -n "$lan_if" ] || lan_if="$(iface_of "$STTCP_BACKUP_LAN")"
[ -n "$lan_if" ] || { echo "provision.sh: no interface holds $STTCP_PRIMARY_LAN or $STTCP_BACKUP_LAN" >&2; exit 1; }

# 1. nfq-sttcp itself, exactly as `make` installs it (idempotent).
STTCP_VENV="$SRC/.venv" bash "$SRC/scripts/bootstrap.sh" runtime

# 2. sysctls of the role.
{
    echo "# nfq-sttcp $role"
    echo "net.ipv4.tcp_timestamps = 1"
    echo "net.ipv4.tcp_sack = 1"
    echo "net.ipv4.tcp_window_scaling = 1"
    if [ "$role" = backup ]; then
        echo "net.ipv4.conf.all.arp_ignore = 1"
        echo "net.ipv4.conf.all.arp_announce = 2"
        echo "net.ipv4.conf.$lan_if.arp_ignore = 1"
        echo "net.ipv4.conf.$lan_if.arp_announce = 2"
        echo "net.ipv4.conf.all.rp_filter = 0"
        echo "net.ipv4.conf.default.rp_filter = 0"
        echo "net.ipv4.conf.$lan_if.rp_filter = 0"
        # While it follows, its stack's window sets the pair's pace:
        # no HyStart, no ssthresh cached from an earlier connection.
        echo "net.ipv4.tcp_congestion_control = reno"
        echo "net.ipv4.tcp_no_metrics_save = 1"
    fi
} | write_if_changed /etc/sysctl.d/60-nfq-sttcp.conf 0644 && sysctl -q --system

# 3. config and key.
if [ -f /tmp/sttcp-sync.key ]; then
    install -D -m 0600 /tmp/sttcp-sync.key "$ETC/sync.key.new"
    if cmp -s "$ETC/sync.key.new" "$ETC/sync.key" 2>/dev/null; then rm -f "$ETC/sync.key.new"; else mv "$ETC/sync.key.new" "$ETC/sync.key"; fi
fi
[ -f "$ETC/sync.key" ] || { echo "provision.sh: no sync key at $ETC/sync.key" >&2; exit 1; }
changed=0
render_config "$lan_if" | write_if_changed "$ETC/config.toml" 0644 && changed=1
"$SRC/.venv/bin/nfq-sttcp" config check --config "$ETC/config.toml"

# 4. units: the daemon of the role and the sample application.
render_units "$lan_if"
systemctl daemon-reload
systemctl enable --now nfq-sttcp-testapp.service >/dev/null
systemctl disable --now nfq-sttcp-"$other".service >/dev/null 2>&1 || true
systemctl enable nfq-sttcp-"$role".service >/dev/null
if [ "$changed" = 1 ]; then
    systemctl restart nfq-sttcp-"$role".service
else
    systemctl start nfq-sttcp-"$role".service
fi
systemctl --no-pager --lines=0 status nfq-sttcp-"$role".service | head -3
