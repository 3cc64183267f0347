#!/usr/bin/env bash
# Installs what the benchmark's outside reference needs (HAProxy, from Debian)
# and builds the release binaries the bench drives. Idempotent; needs root
# (or sudo) for apt-get. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends haproxy
fi
# Debian's package starts a system haproxy on port 80 where systemd runs;
# the bench never uses it and starts its own instances on free ports.
haproxy -v | sed -n 1p  # sed reads it all: no SIGPIPE under pipefail

cargo build --release --workspace
