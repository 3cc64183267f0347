#!/usr/bin/env bash
# baton under a real systemd as PID 1, end to end, under load.
#
# Boots a minimal Debian rootfs (debootstrap; systemd 253+ for
# Type=notify-reload) with `systemd-nspawn --boot --private-network`
# (so all traffic stays on the container's own loopback), installs the
# release baton, hello and baton-bench in it, and checks, with baton-bench
# sending load all along:
#
#   A. baton-app.socket + baton-app.service from examples/systemd
#      (Type=notify-reload), adapted to the example app on loopback:
#      start through the socket, `systemctl reload` (blocking, and seen going
#      reloading -> active), MainPID unchanged, `baton upgrade --self`
#      (MainPID unchanged, the watchdog still fed), kill -9 of baton
#      (systemd restarts it, the socket unit holds the socket), stop;
#   B. a service where baton binds its own socket: the socket is in the fd
#      store (FDSTORE=1), kill -9 of baton, the restarted baton gets it back,
#      reloads, stop (the store is emptied);
#   C. Type=notify + ExecReload=baton upgrade (the pre-253 form): reloads,
#      one upgrade each.
# Every load must end with 0 failed requests and no connection refused; a
# request in flight in the app at the very moment baton is killed dies with
# it (documented), so those are counted and reported apart.
#
# Usage (as root): scripts/systemd-real.sh [--keep-rootfs]
#   SDREAL_DIR      work directory, outside the repo [/var/tmp/baton-systemd-real]
#   SDREAL_SUITE    Debian suite of the rootfs [trixie]
#   SDREAL_MIRROR   Debian mirror for debootstrap [debootstrap's default]
#   SDREAL_RATE     requests/s of each load [300]
#   SDREAL_TIMEOUT  whole run, seconds [900]
#   BATON_BIN_DIR   prebuilt baton, hello and baton-bench [target/release,
#                   built here if missing or older than the last source change]
# A rootfs the script debootstraps is removed at the end unless
# --keep-rootfs; an existing one in SDREAL_DIR/rootfs is reused and kept.
# The container boots with --volatile=overlay: the rootfs is never written.
# Everything else (container, cgroup, network namespace) is torn down on
# any exit. The last line is a one-line summary; exit 0 only if every check
# held. Not part of .ci/run (minutes, root, network for debootstrap).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

keep_rootfs=0
[ "${1:-}" = "--keep-rootfs" ] && keep_rootfs=1
dir=${SDREAL_DIR:-/var/tmp/baton-systemd-real}
suite=${SDREAL_SUITE:-trixie}
mirror=${SDREAL_MIRROR:-}
rate=${SDREAL_RATE:-300}
total_timeout=${SDREAL_TIMEOUT:-900}
started=$(date +%s)

# The one-line summary, printed by teardown once everything is down.
summary="systemd-real: FAIL (stopped before the end)"
die() { echo "systemd-real: $*" >&2; summary="systemd-real: FAIL ($*)"; exit 1; }
log() { printf '[%4ds] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }

failures=(); checks=()
check() { # check NAME COMMAND...: record a failed check, go on
    local name=$1; shift
    checks+=("$name")
    if "$@"; then log "ok   $name"; else log "FAIL $name"; failures+=("$name"); fi
}

# ---- teardown, on any exit --------------------------------------------------
nspawn_pid=""; cg=""; created_rootfs=0; watchdog_pid=""; load_pid=""
kill_tree() { # kill_tree PID: the process and its descendants, by pid
    local p
    for p in $(pgrep -P "$1"); do kill_tree "$p"; done
    kill "$1" 2>/dev/null
}
teardown() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$watchdog_pid" ] && kill "$watchdog_pid" 2>/dev/null
    # A load still running (nsenter'd into the container: not in its cgroup).
    [ -n "$load_pid" ] && kill -0 "$load_pid" 2>/dev/null && kill_tree "$load_pid"
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        log "teardown: powering the container off"
        kill -TERM "$nspawn_pid" 2>/dev/null   # nspawn asks the container's systemd to power off
        for _ in $(seq 1 90); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            log "teardown: still running after 45s: killing its cgroup"
            [ -n "$cg" ] && [ -e "$cg/cgroup.kill" ] && echo 1 > "$cg/cgroup.kill"
            kill -KILL "$nspawn_pid" 2>/dev/null
        fi
        wait "$nspawn_pid" 2>/dev/null
    fi
    if [ -n "$cg" ] && [ -d "$cg" ]; then
        for _ in $(seq 1 20); do
            find "$cg" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null
            rmdir "$cg" 2>/dev/null && break
            sleep 0.25
        done
        [ -d "$cg" ] && log "teardown: could not remove cgroup $cg"
    fi
    if [ "$created_rootfs" = 1 ] && [ "$keep_rootfs" = 0 ]; then
        rm -rf --one-file-system "$dir/rootfs"
    fi
    echo "$summary"
    exit "$rc"
}
trap teardown EXIT
trap 'log "interrupted"; summary="systemd-real: FAIL (interrupted or timed out; ${#failures[@]} checks failed before)"; exit 1' INT TERM
main_pid=$$
watchdog() { # TERM to this script after SDREAL_TIMEOUT; killed by teardown
    sleep "$total_timeout" & local s=$!
    trap 'kill $s 2>/dev/null; exit 0' TERM
    wait "$s" && { log "timed out after ${total_timeout}s"; kill -TERM "$main_pid"; }
}
watchdog &
watchdog_pid=$!

[ "$(id -u)" = 0 ] || die "must run as root"
case "$dir" in "$repo"|"$repo"/*) die "SDREAL_DIR must be outside the repo";; esac

# ---- host tools ------------------------------------------------------------
if ! command -v debootstrap >/dev/null || ! command -v systemd-nspawn >/dev/null; then
    log "installing debootstrap and systemd-container"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        debootstrap systemd-container >/dev/null ||
        die "apt-get install debootstrap systemd-container failed"
fi

# ---- binaries --------------------------------------------------------------
if [ -n "${BATON_BIN_DIR:-}" ]; then
    bin=$BATON_BIN_DIR
else
    bin=${CARGO_TARGET_DIR:-$repo/target}/release
    src_time=$(git log -1 --format=%ct -- crates examples Cargo.toml Cargo.lock)
    stale=0
    for b in baton hello baton-bench; do
        [ -x "$bin/$b" ] && [ "$(stat -c %Y "$bin/$b")" -ge "$src_time" ] || stale=1
    done
    if [ "$stale" = 1 ]; then
        log "building the release binaries"
        cargo build --release -p baton -p hello-rust -p baton-bench >&2 || die "cargo build failed"
    fi
fi
for b in baton hello baton-bench; do [ -x "$bin/$b" ] || die "no $bin/$b"; done
commit=$(git rev-parse --short HEAD)

# ---- rootfs ----------------------------------------------------------------
mkdir -p "$dir"
rootfs=$dir/rootfs
if [ ! -x "$rootfs/usr/lib/systemd/systemd" ]; then
    rm -rf --one-file-system "$rootfs"
    created_rootfs=1
    log "debootstrap $suite into $rootfs (a few minutes)"
    timeout 900 debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,curl,procps,iproute2 \
        "$suite" "$rootfs" ${mirror:+"$mirror"} > "$dir/debootstrap.log" 2>&1 ||
        die "debootstrap failed: see $dir/debootstrap.log"
    echo sdreal > "$rootfs/etc/hostname"
fi
sd_version=$(chroot "$rootfs" /usr/lib/systemd/systemd --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
sd_full=$(chroot "$rootfs" /usr/lib/systemd/systemd --version | head -1)
[ "${sd_version:-0}" -ge 253 ] || die "the rootfs has $sd_full; Type=notify-reload needs 253+"
log "rootfs: $sd_full"

# ---- boot ------------------------------------------------------------------
nspawn=(systemd-nspawn --boot --register=no --keep-unit --private-network
        --volatile=overlay --console=passive --machine=baton-sdreal
        --bind-ro="$bin":/opt/baton-build -D "$rootfs")
if [ "$(cat /proc/1/comm)" = systemd ]; then
    # A systemd host: a delegated scope of its own.
    setsid systemd-run --scope --quiet -p Delegate=yes -- "${nspawn[@]}" \
        > "$dir/nspawn.log" 2>&1 < /dev/null &
    nspawn_pid=$!
else
    # No systemd on the host: a cgroup v2 group of our own for the container.
    if [ -e /sys/fs/cgroup/cgroup.controllers ]; then cgroot=/sys/fs/cgroup
    elif [ -e /sys/fs/cgroup/unified/cgroup.controllers ]; then cgroot=/sys/fs/cgroup/unified
        export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1   # hybrid host: cgroup v2 in the container
    else die "no cgroup v2 hierarchy mounted"; fi
    cg=$cgroot/baton-sdreal-$$
    mkdir "$cg" || die "cannot create $cg"
    setsid bash -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' _ "$cg" "${nspawn[@]}" \
        > "$dir/nspawn.log" 2>&1 < /dev/null &
    nspawn_pid=$!
fi
leader=""
for _ in $(seq 1 100); do
    leader=$(pgrep -P "$nspawn_pid" -x systemd; pgrep -P "$(pgrep -P "$nspawn_pid" | head -1)" -x systemd 2>/dev/null)
    leader=$(echo "$leader" | head -1)
    [ -n "$leader" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.2
done
[ -n "$leader" ] || { cat "$dir/nspawn.log" >&2; die "the container did not start"; }
C() { timeout "${CT:-60}" nsenter -t "$leader" -a "$@"; }   # run inside the container
state=""
for _ in $(seq 1 120); do   # until its bus answers (60 s)
    state=$(C systemctl is-system-running --wait 2>/dev/null)
    [ -n "$state" ] && break
    sleep 0.5
done
log "container up: PID 1 is $(C cat /proc/1/comm) ($sd_full), system $state, host pid $leader"
[ "$(C cat /proc/1/comm)" = systemd ] || die "PID 1 in the container is not systemd"
case "$state" in running|degraded) ;; *) die "system state $state";; esac
C ip -o link | grep -qv ' lo:' && die "the container has more than loopback"

# ---- install ---------------------------------------------------------------
C install -m 755 /opt/baton-build/baton /opt/baton-build/hello /opt/baton-build/baton-bench /usr/local/bin/ ||
    die "install failed"
unit() { C sh -c "cat > /etc/systemd/system/$1"; }
# The units are the shipped examples, adapted: the example app on loopback,
# a short drain, and a 5 s watchdog (so that the run shows it is fed across
# a self-upgrade).
ex=$repo/examples/systemd
adapt() { # adapt NAME LISTEN APP-ARGS [SED]: examples/systemd/baton-app.service as NAME.service
    local name=$1 listen=$2 args=$3 extra=${4:-}
    sed -e "s|^ExecStart=.*|ExecStart=/usr/local/bin/baton run --listen $listen --drain-timeout 10s -- /usr/local/bin/hello$args|" \
        -e "s|/run/baton-app/|/run/$name/|; s|^RuntimeDirectory=.*|RuntimeDirectory=$name|" \
        -e 's|^WatchdogSec=.*|WatchdogSec=5s|' -e "$extra" "$ex/baton-app.service" | unit "$name.service"
}
sed 's|^ListenStream=.*|ListenStream=127.0.0.1:8080|' "$ex/baton-app.socket" | unit baton-app.socket
# A: socket activation. The app takes 1 s to get ready, as real ones do: a
# reload then lasts about that long, so the unit can be seen "reloading"
# (with an app ready in a few ms, RELOADING=1 and READY=1 reach systemd
# within 5 ms).
adapt baton-app http " --delay-ready 1000"
# B: no socket unit; baton binds the address and keeps it in the fd store.
adapt baton-app-fdstore http=127.0.0.1:8081 "" '/^Requires=/d; s|^After=.*|After=network.target|'
# C: the pre-253 form, Type=notify with ExecReload=baton upgrade.
adapt baton-app-execreload http=127.0.0.1:8082 "" \
    '/^Requires=/d; s|^After=.*|After=network.target|; s|^Type=notify-reload$|Type=notify|; s|^#ExecReload=|ExecReload=|'
C systemctl daemon-reload
check "the units pass systemd-analyze verify" C systemd-analyze verify /etc/systemd/system/baton-app.socket \
    /etc/systemd/system/baton-app.service /etc/systemd/system/baton-app-fdstore.service \
    /etc/systemd/system/baton-app-execreload.service

# ---- helpers ---------------------------------------------------------------
prop() { C systemctl show "$1" -p "$2" --value; }
wait_active() { # wait_active UNIT: until ActiveState=active (20 s)
    for _ in $(seq 1 100); do [ "$(prop "$1" ActiveState)" = active ] && return 0; sleep 0.2; done
    return 1
}
load_start() { # load_start NAME PORT CONN SECONDS
    load_t0=$(date +%s%N)
    C baton-bench load --target "127.0.0.1:$2" --rate "$rate" --conn "$3" \
        --duration "$4s" --timeout 5s --json --quiet > "$dir/load-$1.json" 2> "$dir/load-$1.txt" &
    load_pid=$!
}
kill9() { # kill9 PID: kill -9 baton, remembering when (ms into the load)
    kill_ms=$(( ($(date +%s%N) - load_t0) / 1000000 ))
    log "kill -9 of baton (pid $1), about $kill_ms ms into the load"
    C kill -9 "$1"
}
# load_result NAME [KILL-MS] (after wait "$load_pid"): prints
#   "sent failed in-flight-at-kill refused retried max-ms causes"
# A request that was in flight when baton was killed (it overlaps the kill,
# give or take 250 ms of clock skew between this shell and baton-bench)
# dies with the app that had it: documented, so counted apart. A refused
# connection never counts as in flight.
load_result() {
    python3 - "$dir/load-$1.json" "${2:-}" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception:
    print("0 -1 0 0 0 0 no-report"); sys.exit()
kill = float(sys.argv[2]) if sys.argv[2] else None
inflight = 0
if kill is not None:
    for f in d["failures"]:
        if f["cause"] != "refused" and f["start_ms"] <= kill + 250 and f["end_ms"] >= kill - 250:
            inflight += 1
            print(f"in flight at the kill: {f['cause']} from {f['start_ms']:.0f} to {f['end_ms']:.0f} ms",
                  file=sys.stderr)
causes = ",".join(f"{k}={v}" for k, v in d["failed_by_cause"].items() if v) or "-"
print(d["sent"], d["failed"] - inflight, inflight, d["failed_by_cause"]["refused"],
      d["retried"], round(d["latency"]["all"]["max_ms"]), causes)
PY
}
journal_since() { C journalctl -u "$1" -o short-precise --no-pager --since "@$2"; }
results=()

# ---- A: socket unit + Type=notify-reload -------------------------------------
log "== A: baton-app.socket + baton-app.service (Type=notify-reload) =="
tA=$(C date +%s)
C systemctl start baton-app.socket
check "A socket listening" test "$(prop baton-app.socket SubState)" = listening
load_start A 8080 close 40
# The first connection starts baton-app.service through the socket.
check "A service started by the socket" wait_active baton-app.service
pidA=$(prop baton-app.service MainPID)
log "A MainPID $pidA, $(prop baton-app.service StatusText)"
reload_ok=0
for i in 1 2 3 4 5; do
    sleep 1
    if [ "$i" -le 3 ]; then
        # Blocking, as people use it: returns once baton said READY=1.
        t0=$(date +%s%N)
        C systemctl reload baton-app.service && reload_ok=$((reload_ok + 1))
        log "A reload $i: systemctl reload returned after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
        [ "$(prop baton-app.service ActiveState)/$(prop baton-app.service SubState)" = active/running ] ||
            failures+=("A reload $i: not active/running after")
    else
        # Without blocking: watch the unit go reloading -> active.
        states=$(C sh -c 'systemctl reload --no-block baton-app.service
            for _ in $(seq 1 200); do
                s=$(systemctl show -p ActiveState --value baton-app.service); echo "$s"
                case "$s$seen" in active*reloading*) break;; reloading*) seen=" reloading";; esac
                sleep 0.05
            done' | uniq | tr '\n' ' ')
        log "A reload $i: ActiveState seen: $states"
        case "$states" in *reloading*active*) reload_ok=$((reload_ok + 1));; esac
    fi
done
check "A 5 reloads done (3 blocking exit 0, 2 seen reloading->active)" test "$reload_ok" = 5
check "A MainPID unchanged over reloads" test "$(prop baton-app.service MainPID)" = "$pidA"
# baton upgrade --self: a new file at the same path, exec'd in place.
C sh -c 'cp /usr/local/bin/baton /usr/local/bin/baton.new && mv /usr/local/bin/baton.new /usr/local/bin/baton'
C env BATON_CONTROL=/run/baton-app/control.sock baton upgrade --self >&2
check "A baton upgrade --self exit 0" test $? = 0
sleep 7   # longer than WatchdogSec=5s: the new image must keep feeding the watchdog
check "A MainPID unchanged after self-upgrade + 7s" test "$(prop baton-app.service MainPID)" = "$pidA"
check "A no restart after self-upgrade (watchdog fed)" test "$(prop baton-app.service NRestarts)" = 0
check "A reload after self-upgrade" C systemctl reload baton-app.service
# kill -9 baton: systemd restarts it; the socket unit keeps the socket.
kill9 "$pidA"
sleep 0.5
check "A restarted after kill -9" wait_active baton-app.service
pidA2=$(prop baton-app.service MainPID)
check "A the restarted baton was handed the socket unit's socket (LISTEN_FDNAMES=http)" \
    C grep -qz '^LISTEN_FDNAMES=http$' "/proc/$pidA2/environ"
check "A new MainPID after kill -9, NRestarts=1" test "$pidA2" != "$pidA" -a "$(prop baton-app.service NRestarts)" = 1
sleep 1
check "A reload after restart" C systemctl reload baton-app.service
wait "$load_pid"
read -r sent failed inflight refused retried maxms causes < <(load_result A "$kill_ms")
results+=("A (socket unit): $failed failed of $sent, $inflight in flight at the kill -9 (close, max ${maxms} ms)")
check "A load: $failed failed of $sent besides $inflight in flight at the kill, $refused refused ($causes)" \
    test "$failed" = 0 -a "$refused" = 0 -a "$sent" -gt 0
C systemctl stop baton-app.service baton-app.socket
check "A stopped" test "$(prop baton-app.service ActiveState)" = inactive
jA=$(journal_since baton-app.service "$tA")
echo "$jA" > "$dir/journal-A.txt"
nreloading=$(grep -c 'systemd\[1\]: Reloading baton-app.service' <<< "$jA")
nreloaded=$(grep -c 'systemd\[1\]: Reloaded baton-app.service' <<< "$jA")
check "A journal: 7 Reloading/Reloaded pairs ($nreloading/$nreloaded)" test "$nreloading" = 7 -a "$nreloaded" = 7
check "A journal: killed, restarted once" grep -q 'restart counter is at 1' <<< "$jA"
check "A journal: clean stop (supervisor done)" grep -q 'all generations exited; supervisor done' <<< "$jA"

# ---- B: baton's own socket in the fd store ------------------------------------
log "== B: baton-app-fdstore.service (baton binds, FDSTORE=1) =="
tB=$(C date +%s)
C systemctl start baton-app-fdstore.service
check "B started" test "$(prop baton-app-fdstore.service ActiveState)" = active
pidB=$(prop baton-app-fdstore.service MainPID)
check "B socket in the fd store (NFileDescriptorStore=1)" test "$(prop baton-app-fdstore.service NFileDescriptorStore)" = 1
load_start B 8081 close 25
sleep 2
check "B reload 1" C systemctl reload baton-app-fdstore.service
sleep 2
kill9 "$pidB"
sleep 0.5
check "B restarted after kill -9" wait_active baton-app-fdstore.service
check "B new MainPID, NRestarts=1" test "$(prop baton-app-fdstore.service MainPID)" != "$pidB" -a "$(prop baton-app-fdstore.service NRestarts)" = 1
check "B fd store kept across the restart" test "$(prop baton-app-fdstore.service NFileDescriptorStore)" = 1
pidB2=$(prop baton-app-fdstore.service MainPID)
check "B the restarted baton was handed the stored socket (LISTEN_FDNAMES=http)" \
    C grep -qz '^LISTEN_FDNAMES=http$' "/proc/$pidB2/environ"
sleep 2
check "B reload after restart" C systemctl reload baton-app-fdstore.service
sleep 2
check "B reload 3" C systemctl reload baton-app-fdstore.service
wait "$load_pid"
read -r sent failed inflight refused retried maxms causes < <(load_result B "$kill_ms")
results+=("B (fd store): $failed failed of $sent, $inflight in flight at the kill -9 (close, max ${maxms} ms)")
check "B load: $failed failed of $sent besides $inflight in flight at the kill, $refused refused ($causes)" \
    test "$failed" = 0 -a "$refused" = 0 -a "$sent" -gt 0
C systemctl stop baton-app-fdstore.service
check "B stopped, fd store emptied" test "$(prop baton-app-fdstore.service ActiveState)/$(prop baton-app-fdstore.service NFileDescriptorStore)" = inactive/0
journal_since baton-app-fdstore.service "$tB" > "$dir/journal-B.txt"

# ---- C: Type=notify + ExecReload=baton upgrade ---------------------------------
log "== C: baton-app-execreload.service (Type=notify, ExecReload=baton upgrade) =="
tC=$(C date +%s)
C systemctl start baton-app-execreload.service
check "C started" test "$(prop baton-app-execreload.service ActiveState)" = active
pidC=$(prop baton-app-execreload.service MainPID)
load_start C 8082 keep-alive 12
for i in 1 2 3; do sleep 2; check "C reload $i (ExecReload exit 0)" C systemctl reload baton-app-execreload.service; done
check "C MainPID unchanged" test "$(prop baton-app-execreload.service MainPID)" = "$pidC"
wait "$load_pid"
read -r sent failed inflight refused retried maxms causes < <(load_result C)
results+=("C (ExecReload): $failed failed of $sent (keep-alive, $retried retried, max ${maxms} ms)")
check "C load: $failed failed of $sent ($causes)" test "$failed" = 0 -a "$sent" -gt 0
C systemctl stop baton-app-execreload.service
jC=$(journal_since baton-app-execreload.service "$tC")
echo "$jC" > "$dir/journal-C.txt"
nup=$(grep -c 'INFO upgrade succeeded' <<< "$jC")
check "C one upgrade per reload ($nup)" test "$nup" = 3

# ---- summary ---------------------------------------------------------------
log "journals and load reports in $dir"
for r in "${results[@]}"; do log "$r"; done
if [ "${#failures[@]}" = 0 ]; then
    r=$(printf '%s; ' "${results[@]}")
    summary="systemd-real: PASS at $commit, $sd_full as PID 1 (nspawn, private network), ${#checks[@]} checks: ${r%; }"
    exit 0
else
    r=$(printf '%s; ' "${failures[@]}")
    summary="systemd-real: FAIL at $commit, $sd_full: ${#failures[@]} of ${#checks[@]} checks failed: ${r%; }"
    exit 1
fi
