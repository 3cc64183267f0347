#!/usr/bin/env bash
# A fleet on one machine: three app hosts as network namespaces (their own
# addresses on a bridge, sshd and baton running the example app in each),
# HAProxy in front with health checks, continuous load through HAProxy with
# baton-bench, and the Ansible playbooks of examples/ansible run over
# ordinary SSH:
#   1. a good release rolls through all hosts: 0 failed requests;
#   2. a bad release stops at the first host: 0 failed requests, that host
#      still serves the old release, the others are untouched;
#   3. the rollback playbook restores the previous release everywhere.
# Exits 0 only if all of that held; the last line is a one-line summary.
# Everything (namespaces, processes, files) is torn down at the end, even
# on failure. Traffic stays inside the namespaces and their loopback.
#
# Needs root, iproute2, openssh-server, haproxy and Ansible; installs the
# missing ones (apt, and pip into a venv). ~5 minutes on 2 cores.
# BATON_FLEET_PROFILE=debug uses a debug build (faster to build, slower).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

profile=${BATON_FLEET_PROFILE:-release}
chunk_s=${BATON_FLEET_CHUNK_SECONDS:-10}  # load runs in chunks this long
rate=${BATON_FLEET_RATE:-200}             # requests/s per connection mode

say() { printf 'fleet: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, sshd)"

# ---- tools ------------------------------------------------------------------
need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
    say "installing ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
venv=${BATON_FLEET_VENV:-$HOME/.cache/baton-ansible-venv}
if ! command -v ansible-playbook >/dev/null; then
    if [ ! -x "$venv/bin/ansible-playbook" ]; then
        say "installing Ansible into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q ansible-core
    fi
    export PATH="$venv/bin:$PATH"
fi

if [ "$profile" = release ]; then
    cargo build --release --workspace --bins --quiet
else
    cargo build --workspace --bins --quiet
fi
bin=$repo/target/$profile

# ---- teardown ---------------------------------------------------------------
work=$(mktemp -d /tmp/baton-fleet.XXXXXX)
tag=bf$$                      # namespace names unique to this run
nodes=(ctl h1 h2 h3)
declare -A addr=([ctl]=10.77.0.1 [h1]=10.77.0.11 [h2]=10.77.0.12 [h3]=10.77.0.13)
hosts=(h1 h2 h3)
ns() { echo "$tag-$1"; }
in_ns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }

cleanup() {
    local rc=$?
    set +e
    # Only processes inside our namespaces: sshd, baton and its apps,
    # haproxy, the load generators.
    for n in "${nodes[@]}" lan; do
        pids=$(ip netns pids "$(ns "$n")" 2>/dev/null)
        [ -n "$pids" ] && kill $pids 2>/dev/null
    done
    for _ in $(seq 1 50); do
        left=""
        for n in "${nodes[@]}" lan; do left+=$(ip netns pids "$(ns "$n")" 2>/dev/null); done
        [ -z "$left" ] && break
        sleep 0.2
    done
    for n in "${nodes[@]}" lan; do
        pids=$(ip netns pids "$(ns "$n")" 2>/dev/null)
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null
        ip netns del "$(ns "$n")" 2>/dev/null
    done
    if [ "${BATON_FLEET_KEEP:-}" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- network: a bridge in its own namespace, one veth per node ---------------
ip netns add "$(ns lan)"
ip -n "$(ns lan)" link set lo up
ip -n "$(ns lan)" link add br0 type bridge
ip -n "$(ns lan)" link set br0 up
for n in "${nodes[@]}"; do
    ip netns add "$(ns "$n")"
    ip -n "$(ns "$n")" link set lo up
    ip link add eth0 netns "$(ns "$n")" type veth peer name "$n" netns "$(ns lan)"
    ip -n "$(ns lan)" link set "$n" master br0 up
    ip -n "$(ns "$n")" addr add "${addr[$n]}/24" dev eth0
    ip -n "$(ns "$n")" link set eth0 up
done
say "network: ctl ${addr[ctl]}, hosts ${addr[h1]} ${addr[h2]} ${addr[h3]} (bridge in $(ns lan))"

# ---- sshd in every host -----------------------------------------------------
ssh-keygen -q -t ed25519 -N '' -f "$work/id" -C baton-fleet
ssh-keygen -q -t ed25519 -N '' -f "$work/hostkey" -C baton-fleet-host
cp "$work/id.pub" "$work/authorized_keys"
mkdir -p /run/sshd
for h in "${hosts[@]}"; do
    mkdir -p "$work/$h"
    cat > "$work/$h/sshd_config" <<EOF
ListenAddress ${addr[$h]}
HostKey $work/hostkey
PidFile $work/$h/sshd.pid
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
    in_ns "$h" /usr/sbin/sshd -f "$work/$h/sshd_config" -E "$work/$h/sshd.log"
done
# Each host's sshd is reachable from ctl across the bridge (bounded wait).
for h in "${hosts[@]}"; do
    up=""
    for _ in $(seq 1 50); do
        if in_ns ctl timeout 2 bash -c "exec 3<>/dev/tcp/${addr[$h]}/22" 2>/dev/null; then up=1; break; fi
        sleep 0.1
    done
    [ -n "$up" ] || die "cannot reach sshd on $h (${addr[$h]}) from ctl"
done

# ---- artifacts: the example app, a good and a bad release --------------------
make_release() { # name version [bad]
    local tree=$work/artifacts/$1
    mkdir -p "$tree/bin"
    echo "$2" > "$tree/VERSION"
    if [ "${3:-}" = bad ]; then
        printf '#!/bin/sh\necho "%s: missing DATABASE_URL, cannot start" >&2\nexit 3\n' "$2" > "$tree/bin/hello"
        chmod +x "$tree/bin/hello"
    else
        cp "$bin/hello" "$tree/bin/hello"
    fi
    tar czf "$work/artifacts/app-$2.tar.gz" -C "$tree" .
}
make_release v1 v1
make_release v2 v2
make_release v3 v3 bad

# ---- Ansible: inventory and install (site.yml) -------------------------------
{
    cat <<EOF
all:
  children:
    app:
      vars:
        ansible_user: root
        ansible_ssh_private_key_file: $work/id
        ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
        ansible_python_interpreter: /usr/bin/python3
        baton_binary_src: $bin/baton
        baton_service_manager: none
        baton_command: ["./bin/hello"]
        baton_drain_timeout: 10s
        baton_ready_timeout: 10s
        baton_keep_releases: 3
      hosts:
EOF
    for h in "${hosts[@]}"; do
        cat <<EOF
        $h:
          ansible_host: ${addr[$h]}
          baton_bin_dir: $work/$h/bin
          baton_config_dir: $work/$h/etc
          baton_releases_dir: $work/$h/srv
          baton_control: $work/$h/control.sock
          baton_log_file: $work/$h/baton.log
EOF
    done
} > "$work/inventory.yml"
export ANSIBLE_LOCAL_TEMP=$work/ansible-local ANSIBLE_REMOTE_TEMP=$work/ansible-remote
export ANSIBLE_HOST_KEY_CHECKING=False ANSIBLE_NOCOLOR=1 ANSIBLE_RETRY_FILES_ENABLED=False
playbook() { # log-name playbook args...
    local log=$work/$1.log; shift
    local t0=$SECONDS rc=0
    in_ns ctl ansible-playbook -i "$work/inventory.yml" "$repo/examples/ansible/$@" > "$log" 2>&1 || rc=$?
    echo "$((SECONDS - t0))s" > "$log.time"
    return $rc
}
playbook install site.yml -e baton_initial_artifact="$work/artifacts/app-v1.tar.gz" ||
    { cat "$work/install.log" >&2; die "site.yml failed"; }
say "installed baton on ${hosts[*]} with release app-v1 ($(cat "$work/install.log.time"))"

version_of() { in_ns ctl curl -s --max-time 5 "http://${addr[$1]}:8080/" | sed -n 's/.*version=\([^ ]*\).*/\1/p'; }
for h in "${hosts[@]}"; do
    [ "$(version_of "$h")" = v1 ] || die "$h does not serve v1"
done

# ---- HAProxy in front, health-checking every host ----------------------------
cat > "$work/haproxy.cfg" <<EOF
global
    maxconn 4096
    stats socket $work/haproxy.sock level admin
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:8080
    default_backend app
backend app
    balance roundrobin
    option httpchk GET /healthz
EOF
for h in "${hosts[@]}"; do
    echo "    server $h ${addr[$h]}:8080 check inter 500ms fall 2 rise 2" >> "$work/haproxy.cfg"
done
in_ns ctl haproxy -db -f "$work/haproxy.cfg" > "$work/haproxy.log" 2>&1 &
for _ in $(seq 1 50); do
    [ "$(in_ns ctl curl -s --max-time 2 -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/)" = 200 ] && break
    sleep 0.2
done
haproxy_stat() { # server field
    in_ns ctl python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"show stat\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk: break
    data += chunk
lines = data.decode().splitlines()
head = lines[0].lstrip("# ").split(",")
for l in lines[1:]:
    f = dict(zip(head, l.split(",")))
    if f.get("svname") == sys.argv[2]: print(f.get(sys.argv[3], ""))
' "$work/haproxy.sock" "$1" "$2"
}

# ---- a phase: load through HAProxy while a playbook runs ---------------------
# The load runs in back-to-back chunks until the playbook has ended, so it
# covers the whole run however long Ansible takes; each chunk's report is
# kept and they are added up.
load_loop() { # name conn
    local i=0
    while [ ! -e "$work/$1.stop" ]; do
        i=$((i + 1))
        in_ns ctl "$bin/baton-bench" load --target 127.0.0.1:8080 --conn "$2" \
            --rate "$rate" --concurrency 16 --duration "${chunk_s}s" --json --quiet \
            > "$work/$1-$2-$i.json" 2> "$work/$1-$2-$i.txt" || { echo "chunk $i failed" >> "$work/$1.errors"; }
    done
}
failed_total=0
summary=()
phase() { # name expect(ok|fail) playbook args...
    local name=$1 expect=$2; shift 2
    local pids=()
    for conn in keep-alive close; do
        load_loop "$name" "$conn" &
        pids+=($!)
    done
    sleep 2   # steady load before the playbook starts
    local rc=0 t0=$SECONDS
    playbook "$name" "$@" || rc=$?
    local took=$((SECONDS - t0))
    sleep 2   # and after it
    touch "$work/$name.stop"
    for p in "${pids[@]}"; do wait "$p"; done
    [ ! -e "$work/$name.errors" ] || die "$name: baton-bench failed: $(cat "$work/$name.errors")"
    if [ "$expect" = ok ] && [ $rc != 0 ]; then cat "$work/$name.log" >&2; die "$name: playbook failed"; fi
    if [ "$expect" = fail ] && [ $rc = 0 ]; then cat "$work/$name.log" >&2; die "$name: playbook did not stop"; fi
    local sent=0 failed=0 line
    for conn in keep-alive close; do
        line=$(python3 - "$work" "$name" "$conn" <<'EOF'
import glob, json, sys
work, name, conn = sys.argv[1:]
rs = [json.load(open(p)) for p in glob.glob(f"{work}/{name}-{conn}-*.json")]
sent = sum(r["sent"] for r in rs)
dur = sum(r["duration_s"] for r in rs)
p99 = max(r["latency"]["all"]["p99_ms"] for r in rs)
print(sent, sum(r["succeeded"] for r in rs), sum(r["failed"] for r in rs), round(sent / dur), p99, len(rs))
EOF
)
        read -r s ok f rps p99 chunks <<< "$line"
        sent=$((sent + s)); failed=$((failed + f))
        say "$name [$conn]: $s requests, $ok ok, $f failed, $rps req/s, worst chunk p99 $p99 ms ($chunks chunks)"
    done
    failed_total=$((failed_total + failed))
    say "$name: playbook ${took}s, $sent requests through HAProxy, $failed failed"
    summary+=("$name: $failed/$sent failed")
}

state_of() { # host -> "active-generation current-link releases..."
    local c=$work/$1/control.sock
    echo "$("$bin/baton" --control "$c" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["active"])')" \
        "$(readlink "$work/$1/srv/current")" \
        "$(ls "$work/$1/srv/releases" | tr '\n' ' ')"
}

# 1. A good release rolls through every host.
phase good-rollout ok deploy.yml -e artifact="$work/artifacts/app-v2.tar.gz"
for h in "${hosts[@]}"; do
    [ "$(version_of "$h")" = v2 ] || die "$h does not serve v2 after the rollout"
done
say "every host serves v2"

# 2. A bad release stops at the first host; the others are untouched.
before_h2=$(state_of h2); before_h3=$(state_of h3)
phase bad-rollout fail deploy.yml -e artifact="$work/artifacts/app-v3.tar.gz"
grep -q 'v3: missing DATABASE_URL' "$work/bad-rollout.log" || die "the failure report lacks the app's stderr"
[ "$(version_of h1)" = v2 ] || die "h1 does not serve v2 after the failed deploy"
[ "$(readlink "$work/h1/srv/current")" = releases/app-v2 ] || die "h1's current was not put back"
[ "$(state_of h2)" = "$before_h2" ] || die "h2 was touched: $before_h2 -> $(state_of h2)"
[ "$(state_of h3)" = "$before_h3" ] || die "h3 was touched: $before_h3 -> $(state_of h3)"
grep -q 'h2' <(sed -n '/PLAY RECAP/,$p' "$work/bad-rollout.log") &&
    die "the play went on to h2 after h1 failed"
say "the bad release stopped at h1 (still serving v2, current back on app-v2); h2 and h3 untouched"

# 3. The rollback playbook restores v1 everywhere.
phase rollback ok rollback.yml
for h in "${hosts[@]}"; do
    [ "$(version_of "$h")" = v1 ] || die "$h does not serve v1 after the rollback"
    [ "$(readlink "$work/$h/srv/current")" = releases/app-v1 ] || die "$h's current does not follow the rollback"
done
say "every host serves v1 again"

# HAProxy's view: no connection to a host was refused or failed, no
# request was redispatched to another host, no host was ever marked down.
# Response errors (a pooled keep-alive connection to a draining old
# version closed as HAProxy sent a request on it) are counted and shown:
# HAProxy sends such a request again, so the client never sees them.
errors=0
for h in "${hosts[@]}"; do
    econ=$(haproxy_stat "$h" econ); eresp=$(haproxy_stat "$h" eresp)
    wretr=$(haproxy_stat "$h" wretr); wredis=$(haproxy_stat "$h" wredis)
    chkdown=$(haproxy_stat "$h" chkdown); total=$(haproxy_stat "$h" stot)
    say "haproxy $h: $total requests, connection errors $econ, response errors $eresp, retries $wretr, redispatches $wredis, marked down $chkdown times"
    [ "$econ$wredis$chkdown" = 000 ] || die "HAProxy saw $h refuse or fail a connection, redispatched, or marked it down"
    errors=$((errors + eresp))
done
# Every request HAProxy logged whose session did not end normally
# (termination state other than ----) or that was retried.
python3 - "$work/haproxy.log" > "$work/haproxy-abnormal.log" <<'EOF'
import re, sys
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r' (\d{3}|-1) \d+ \S+ \S+ (\S{4}) (\d+)/(\d+)/(\d+)/(\d+)/\+?(\d+) ', line)
    if m and (m.group(2) != "----" or m.group(7) != "0"):
        print(line.rstrip())
EOF
logged=$(grep -c ' "GET ' "$work/haproxy.log" || true)
abnormal=$(grep -c . "$work/haproxy-abnormal.log" || true)
say "haproxy logged $logged requests; $abnormal ended abnormally or were retried"
sed 's/^/fleet:   /' "$work/haproxy-abnormal.log" | head -10 >&2
summary+=("haproxy: 0 connection errors, 0 hosts marked down, $errors re-sent responses")

[ "$failed_total" = 0 ] || die "$failed_total requests failed"
echo "fleet: PASS: 3 namespace hosts behind HAProxy, under load: ${summary[*]/%/;} good release on all, bad release stopped at h1 (others untouched), rollback restored v1"
