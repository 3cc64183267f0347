#!/usr/bin/env bash
# Builds baton and the example app, runs the app under baton on a free
# loopback port, and upgrades it 10 times while baton-bench sends load in
# both connection modes. Prints the failures (there should be none).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --bins
bin=target/release
work=$(mktemp -d)
trap 'kill "$baton_pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

echo v1 > "$work/VERSION"
(cd "$work" && exec "$OLDPWD/$bin/baton" --control "$work/ctl/control.sock" \
    run --listen http=127.0.0.1:0 -- "$OLDPWD/$bin/hello") 2> "$work/baton.log" &
baton_pid=$!

# Wait (bounded) for the first generation to be active, then find its port.
for _ in $(seq 1 100); do
    grep -q "generation active" "$work/baton.log" 2>/dev/null && break
    sleep 0.1
done
addr=$("$bin/baton" --control "$work/ctl/control.sock" status --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["sockets"][0]["address"])')
echo "hello is serving on $addr under baton (pid $baton_pid)"
"$bin/baton" --control "$work/ctl/control.sock" status

for conn in close keep-alive; do
    echo
    echo "== 10 upgrades under load, connection mode: $conn =="
    "$bin/baton-bench" load --target "$addr" --conn "$conn" --concurrency 16 \
        --control "$work/ctl/control.sock" --cutovers 10 --interval 500ms --quiet
done

echo
"$bin/baton" --control "$work/ctl/control.sock" status
"$bin/baton" --control "$work/ctl/control.sock" stop
