#!/usr/bin/env bash
# Installs what the benchmark's outside references need (HAProxy and nginx,
# from Debian), the real servers of `baton-bench servers` and `tools` (gunicorn and uvicorn,
# pinned, from PyPI into target/bench-venv; PM2, pinned, from npm into
# target/bench-node; Node.js from Debian if missing) and builds the
# release binaries the bench drives. Idempotent; needs root
# (or sudo) for apt-get. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
# nginx is in /usr/sbin, which a non-root PATH may lack.
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's packages start a system haproxy and nginx on port 80 where
# systemd runs; the bench never uses them and starts its own instances on
# free loopback ports.
haproxy -v | sed -n 1p  # sed reads it all: no SIGPIPE under pipefail
PATH="$PATH:/usr/sbin" nginx -v

# The real servers: pinned, so a run is repeatable; in a virtualenv of the
# bench's own, so nothing system-wide changes.
if ! command -v node >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs
fi
node --version
if [ ! -x target/bench-venv/bin/gunicorn ] || [ ! -x target/bench-venv/bin/uvicorn ]; then
    python3 -m venv target/bench-venv
    target/bench-venv/bin/pip install -q "gunicorn==27.0.1" "uvicorn==0.54.0"
fi
target/bench-venv/bin/gunicorn --version
target/bench-venv/bin/uvicorn --version
# PM2 for `baton-bench tools` (its cluster-mode reload), pinned, from npm.
if [ ! -x target/bench-node/node_modules/.bin/pm2 ]; then
    npm install --silent --no-audit --no-fund --prefix target/bench-node "pm2@5.4.3"
fi
# (Its version from the package: `pm2 --version` would start its daemon.)
echo "pm2 $(node -p "require('./target/bench-node/node_modules/pm2/package.json').version")"

cargo build --release --workspace
