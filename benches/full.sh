#!/usr/bin/env bash
# The full benchmark scenario: 200 cutovers per connection mode under baton
# with steered traffic (the default) and 200 with shared sockets, 20
# rollbacks during a bake, a 10%-canary over 10 000 new connections, the app
# alone, the naive deploy, HAProxy and the spawn-only control, in one run of
# about ten minutes. Writes bench-out/{report.json,summary.txt,
# timeline-*.svg,logs/} and the pictures docs/benchmarks.md shows:
# docs/bench-timeline.svg (steered, keep-alive), docs/bench-timeline-close.svg
# (steered, close) and docs/bench-timeline-naive.svg (first 20 s of each run).
# Extra arguments go to `baton-bench full` (see `baton-bench full --help`).
#
# Run benches/setup.sh once first (installs HAProxy, builds). The figures are
# only meaningful on an otherwise idle machine: the bench warns when the load
# average says something else is running.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace
exec target/release/baton-bench full --out bench-out --plot docs/bench-timeline.svg "$@"
