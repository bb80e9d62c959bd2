#!/usr/bin/env bash
# Installs everything nfq-sttcp needs on a fresh Debian/Ubuntu host and builds
# the project venv. Safe to run again: each step checks before it acts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STTCP_VENV:-$ROOT/.venv}"
EXTRAS="${1:-dev}"  # dev: with the test tools; runtime: the daemons only; bench: with the plotting library

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: must run as root (it installs packages and creates network namespaces)" >&2
    exit 1
fi

APT_PACKAGES=(iptables iproute2 tcpdump libnetfilter-queue-dev libnfnetlink-dev
              build-essential python3 python3-venv python3-dev python3-pip make procps)
if [ "$EXTRAS" = dev ]; then
    # What the tests check the real-host path with (vagrant validate, shellcheck),
    # and the VRRP daemon the keepalived test runs.
    APT_PACKAGES+=(vagrant shellcheck keepalived)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The NFQUEUE target is reachable only through the xt compat layer of iptables-nft.
if command -v update-alternatives >/dev/null && [ -x /usr/sbin/iptables-nft ]; then
    update-alternatives --set iptables /usr/sbin/iptables-nft >/dev/null 2>&1 || true
fi

PY="${STTCP_PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating venv $VENV"
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.sttcp-installed-$EXTRAS"
# setup.py builds the C helpers (nfq_sttcp/_csum.c, nfq_sttcp/_bpfsys.c) in place.
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ] \
        || [ "$ROOT/setup.py" -nt "$stamp" ] || [ "$ROOT/nfq_sttcp/_csum.c" -nt "$stamp" ] \
        || [ "$ROOT/nfq_sttcp/_bpfsys.c" -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if [ "$EXTRAS" = runtime ]; then
        "$VENV/bin/python" -m pip install -q -e "$ROOT"
    else
        "$VENV/bin/python" -m pip install -q -e "${ROOT}[${EXTRAS}]"
    fi
    touch "$stamp"
fi
echo "bootstrap: ready ($("$VENV/bin/python" --version), $(iptables --version))"
