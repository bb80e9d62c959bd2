# shellcheck shell=bash
# shellcheck disable=SC2034  # STTCP_ROLE, STTCP_PRINT and the settings are read by the sourcing script
# Settings and rule rendering shared by iptables/apply and iptables/remove.
# Only bash and iptables are needed. The output is identical to
# `nfq-sttcp rules render` for the same settings (a test checks this).

STTCP_KEYS="VIP PORTS LAN_IF BACKUP_SYNC QUEUE_PRIMARY_OUT QUEUE_BACKUP_IN QUEUE_BACKUP_OUT MARK CHAIN_PREFIX SOURCE"

sttcp_defaults() {
    # The namespace lab's settings.
    VIP=10.77.0.100
    PORTS=7000,7001,7002,7003,7004
    LAN_IF=lan0
    BACKUP_SYNC=10.78.0.2
    QUEUE_PRIMARY_OUT=11
    QUEUE_BACKUP_IN=12
    QUEUE_BACKUP_OUT=13
    MARK=0x5717
    CHAIN_PREFIX=STTCP
    SOURCE="nfq-sttcp lab"
}

# sttcp_set KEY=VALUE: set one known setting, refuse anything else.
sttcp_set() {
    local key="${1%%=*}" value="${1#*=}"
    case " $STTCP_KEYS " in
        *" $key "*) printf -v "$key" '%s' "$value" ;;
        *) echo "unknown setting '$key' (known: $STTCP_KEYS)" >&2; return 2 ;;
    esac
}

# sttcp_load_env FILE: KEY=VALUE lines; blank lines and # comments ignored. Never executed.
sttcp_load_env() {
    local line n=0
    [ -r "$1" ] || { echo "cannot read settings file $1" >&2; return 1; }
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in ""|\#*) continue ;; esac
        line="${line//\"/}"
        [[ "$line" == *=* ]] || { echo "$1:$n: expected KEY=VALUE" >&2; return 2; }
        sttcp_set "$line" || return 2
    done < "$1"
    SOURCE="$1"
}

sttcp_check() {
    [[ "$VIP" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "VIP '$VIP' is not an IPv4 address" >&2; return 2; }
    [[ "$BACKUP_SYNC" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "BACKUP_SYNC '$BACKUP_SYNC' is not an IPv4 address" >&2; return 2; }
    [[ "$PORTS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "PORTS '$PORTS' must be a comma-separated list of ports" >&2; return 2; }
    [[ "$CHAIN_PREFIX" =~ ^[A-Z][A-Z0-9_-]{0,15}$ ]] || { echo "CHAIN_PREFIX '$CHAIN_PREFIX' is not valid" >&2; return 2; }
    local q
    for q in "$QUEUE_PRIMARY_OUT" "$QUEUE_BACKUP_IN" "$QUEUE_BACKUP_OUT" "$MARK"; do
        [[ "$q" =~ ^(0x[0-9a-fA-F]+|[0-9]+)$ ]] || { echo "'$q' is not a number" >&2; return 2; }
    done
}

# sttcp_chains ROLE: "table builtin chain" per line.
sttcp_chains() {
    if [ "$1" = primary ]; then
        echo "mangle PREROUTING $CHAIN_PREFIX-TEE"
        echo "mangle POSTROUTING $CHAIN_PREFIX-POUT"
        echo "mangle PREROUTING $CHAIN_PREFIX-PIN"  # (the daemon's, with tuning.fast_path)
    else
        echo "raw PREROUTING $CHAIN_PREFIX-BIN"
        echo "mangle POSTROUTING $CHAIN_PREFIX-BOUT"
    fi
}

# Ports sorted, in groups of at most 15 (the multiport limit).
_sttcp_port_groups() {
    local sorted
    sorted="$(tr ',' '\n' <<< "$PORTS" | sort -n | tr '\n' ' ')"
    local -a all
    read -r -a all <<< "$sorted"
    local i group
    for ((i = 0; i < ${#all[@]}; i += 15)); do
        group="$(IFS=,; echo "${all[*]:i:15}")"
        echo "$group"
    done
}

# sttcp_render ROLE: iptables-restore --noflush input.
sttcp_render() {
    local role="$1" mark group
    mark="$(printf '0x%x' "$MARK")"
    echo "# nfq-sttcp $role rules (rendered from $SOURCE)"
    if [ "$role" = primary ]; then
        echo "*mangle"
        echo ":$CHAIN_PREFIX-TEE - [0:0]"
        echo ":$CHAIN_PREFIX-POUT - [0:0]"
        echo "-I PREROUTING 1 -j $CHAIN_PREFIX-TEE"
        echo "-I POSTROUTING 1 -j $CHAIN_PREFIX-POUT"
        while read -r group; do
            echo "-A $CHAIN_PREFIX-TEE -i $LAN_IF -d $VIP/32 -p tcp -m multiport --dports $group -j TEE --gateway $BACKUP_SYNC"
        done < <(_sttcp_port_groups)
        while read -r group; do
            echo "-A $CHAIN_PREFIX-POUT -s $VIP/32 -p tcp -m multiport --sports $group -m mark ! --mark $mark -j NFQUEUE --queue-num $QUEUE_PRIMARY_OUT --queue-bypass"
        done < <(_sttcp_port_groups)
        echo "COMMIT"
    else
        echo "*raw"
        echo ":$CHAIN_PREFIX-BIN - [0:0]"
        echo "-I PREROUTING 1 -j $CHAIN_PREFIX-BIN"
        while read -r group; do
            echo "-A $CHAIN_PREFIX-BIN -d $VIP/32 -p tcp -m multiport --dports $group -m mark ! --mark $mark -j NFQUEUE --queue-num $QUEUE_BACKUP_IN"
        done < <(_sttcp_port_groups)
        echo "COMMIT"
        echo "*mangle"
        echo ":$CHAIN_PREFIX-BOUT - [0:0]"
        echo "-I POSTROUTING 1 -j $CHAIN_PREFIX-BOUT"
        while read -r group; do
            echo "-A $CHAIN_PREFIX-BOUT -s $VIP/32 -p tcp -m multiport --sports $group -m mark ! --mark $mark -j NFQUEUE --queue-num $QUEUE_BACKUP_OUT"
        done < <(_sttcp_port_groups)
        echo "COMMIT"
    fi
}

# sttcp_parse_args ROLE_VAR "$@": ROLE, then --env FILE, --print, KEY=VALUE in any order.
sttcp_parse_args() {
    STTCP_PRINT=0
    sttcp_defaults
    case "${1:-}" in
        primary|backup) STTCP_ROLE="$1"; shift ;;
        *) return 3 ;;
    esac
    while [ $# -gt 0 ]; do
        case "$1" in
            --env) [ $# -ge 2 ] || { echo "--env needs a file" >&2; return 2; }; sttcp_load_env "$2" || return $?; shift 2 ;;
            --print) STTCP_PRINT=1; shift ;;
            *=*) sttcp_set "$1" || return $?; shift ;;
            *) echo "unexpected argument '$1'" >&2; return 2 ;;
        esac
    done
    sttcp_check
}
