#!/usr/bin/env bash
# Run each cross-built binary under qemu-user and prove it works:
#   help      `outpost --help` exits 0 and prints usage
#   version   `outpost version` prints `outpost X.Y.Z (<arch>...)`, arch of the target
#   exchange  the cross-built binary makes the node's key pair (`keys gen`, under
#             qemu) and trusts the native central for exec; the central trusts the
#             node's key for results; the node agent connects to a native mosquitto
#             and the central's `send ... exec -- echo ...` must print the node's
#             line (every payload sealed end to end)
#   rss       x86_64 only (native, no qemu in the way): idle RSS of the agent
#
#   cross/qemu-check.sh                          # aarch64 armv7 armv6 mipsel mips
#   cross/qemu-check.sh x86_64 mips              # some targets
#   STEPS="help exchange" cross/qemu-check.sh    # some steps
#
# Needs cross/build-all.sh to have run for the targets and for x86_64 (the native
# central). Installs qemu-user-static and mosquitto if missing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=cross/targets.sh
source "$here/targets.sh"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

steps=${STEPS:-help version exchange rss}
timeout_s=${EXCHANGE_TIMEOUT:-180}
dist=${DIST:-$root/target/dist}
central_bin=${CENTRAL:-$dist/x86_64-unknown-linux-musl/outpost}

selected=()
if (($# == 0)); then
    for t in aarch64 armv7 armv6 mipsel mips; do selected+=("$(resolve_target "$t")"); done
else
    for t in "$@"; do selected+=("$(resolve_target "$t")"); done
fi

missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get install -y "${missing[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/outpost-qemu.XXXXXX)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if ((${KEEP:-0})); then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# One native broker for every target, on a free port.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)
broker="mqtt://127.0.0.1:$port"
for _ in $(seq 50); do
    mosquitto_pub -h 127.0.0.1 -p "$port" -t outpost-qemu/ready -n 2>/dev/null && break
    sleep 0.1
done
say "mosquitto on 127.0.0.1:$port"

# Wait until NODE's retained presence says `online`; fail after SECS seconds or as
# soon as the agent process PID has exited.
wait_online() {
    local node=$1 secs=$2 pid=$3 deadline=$((SECONDS + $2)) got
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || { echo "agent $node exited early"; return 1; }
        got=$(mosquitto_sub -h 127.0.0.1 -p "$port" -t "outpost/$node/presence" -C 1 -W 2 \
            -F '%p' 2>/dev/null) || true
        [[ $got == online ]] && return 0
    done
    echo "agent $node not online after ${secs}s"
    return 1
}

# Idle RSS in kB (VmRSS) of a native process.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# `keys gen` prints "NAME PUBLIC-KEY"; echo the key.
pubkey_of() {
    local line
    line=$("$@" 2>&1) || { echo "keys gen failed: $line" >&2; return 1; }
    line=${line##* }
    [[ $line =~ ^[0-9a-f]{64}$ ]] || { echo "keys gen printed no key: $line" >&2; return 1; }
    echo "$line"
}

# One central per exchange, started after both trust files are written: the agent
# re-reads its trust file when a message reaches its own inbox, not before it seals a
# command, so a central started before it trusted the node drops the command
# ("cannot seal for NODE: not in the trust file") and waits for a reply that never comes.
central_pid=""
central_dir=""
central_key=""
new_central() { # DIR: make the central's key pair
    [[ -x $central_bin ]] || { echo "no native central at $central_bin (run cross/build-all.sh x86_64)"; return 1; }
    central_dir=$1
    mkdir -p "$central_dir"
    central_key=$(pubkey_of "$central_bin" keys gen --state-dir "$central_dir" --name central 2>&1) ||
        { echo "$central_key"; return 1; }
}
start_central() {
    "$central_bin" agent --name central --broker "$broker" --state-dir "$central_dir" \
        >"$central_dir.log" 2>&1 &
    central_pid=$!
    pids+=("$central_pid")
    wait_online central 30 "$central_pid" || { echo "see $central_dir.log"; tail -n 5 "$central_dir.log"; return 1; }
}
stop_central() {
    [[ -n $central_pid ]] || return 0
    kill "$central_pid" 2>/dev/null || true
    wait "$central_pid" 2>/dev/null || true
    central_pid=""
}

# Each step prints why it failed on stdout and returns non-zero.
step_help() {
    local out
    out=$($1 "$2" --help 2>&1) || { echo "--help exited $?: $out"; return 1; }
    grep -qi 'usage' <<<"$out" || { echo "--help printed no usage: ${out:0:200}"; return 1; }
}

# `outpost version` prints `outpost X.Y.Z (ARCH)`, ARCH as Rust names it (arm for
# armv6 and armv7, mips for mipsel).
step_version() {
    local out arch=${3%%-*}
    case $arch in armv7 | arm) arch=arm ;; mipsel) arch=mips ;; esac
    out=$($1 "$2" version 2>&1) || { echo "version exited $?: $out"; return 1; }
    [[ $out =~ ^outpost\ [0-9]+\.[0-9]+\.[0-9]+[^\ ]*\ \($arch[,\)] ]] ||
        { echo "unexpected version line: ${out:0:200}"; return 1; }
    echo "$out"
}

step_exchange() {
    local qemu=$1 bin=$2 t=$3
    local node="node-${t%%-*}"
    node=${node//_/-}
    new_central "$work/central-$node" || return 1
    mkdir -p "$work/$node"
    # Keys and trust both ways: the node (cross-built, under qemu) makes its key pair
    # and lets central run exec; central accepts the node's results.
    local node_key out
    node_key=$(pubkey_of $qemu "$bin" keys gen --state-dir "$work/$node" --name "$node" 2>&1) ||
        { echo "$node_key"; return 1; }
    out=$($qemu "$bin" keys trust --state-dir "$work/$node" central "$central_key" --allow exec 2>&1) ||
        { echo "node: keys trust central exited $?: $out"; return 1; }
    out=$("$central_bin" keys trust --state-dir "$central_dir" "$node" "$node_key" 2>&1) ||
        { echo "central: keys trust $node exited $?: $out"; return 1; }
    start_central || return 1
    $qemu "$bin" agent --name "$node" --broker "$broker" --state-dir "$work/$node" \
        >"$work/$node.log" 2>&1 &
    local node_pid=$!
    pids+=("$node_pid")
    # Under qemu a mips agent takes a few seconds to open its store and connect.
    wait_online "$node" 60 "$node_pid" || { echo "see $work/$node.log"; tail -n 5 "$work/$node.log"; stop_central; return 1; }
    local want="$node: exchange-ok-$t" rc=0
    out=$(timeout "$timeout_s" "$central_bin" send --state-dir "$central_dir" --to "$node" \
        exec -- echo "exchange-ok-$t" 2>&1) || rc=$?
    kill "$node_pid" 2>/dev/null || true
    stop_central
    ((rc == 0)) || { echo "send exited $rc: ${out: -300}"; return 1; }
    grep -qxF "$want" <<<"$out" || { echo "expected '$want', got: ${out: -300}"; return 1; }
    echo "$out"
}

step_rss() {
    local bin=$2 t=$3
    [[ $t == x86_64-* ]] || { echo "skip (qemu's own memory would be counted)"; return 2; }
    mkdir -p "$work/idle"
    "$bin" agent --name idle --broker "$broker" --state-dir "$work/idle" >"$work/idle.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    wait_online idle 30 "$pid" || { echo "see $work/idle.log"; tail -n 5 "$work/idle.log"; return 1; }
    sleep 10 # idle on purpose: this measures the agent at rest, not a synchronisation
    local kb
    kb=$(rss_kb "$pid")
    kill "$pid" 2>/dev/null || true
    echo "idle RSS ${kb} kB"
    ((kb <= 5 * 1024)) || { echo "over the 5 MB budget by $((kb - 5 * 1024)) kB"; return 1; }
}

rows=()
failed=0
for t in "${selected[@]}"; do
    bin="$dist/$t/outpost"
    qemu=$(qemu_of "$t")
    # Run through `env` so an empty qemu (x86_64) still gives a command word.
    runner="env ${qemu}"
    row=$(printf '%-32s' "$t")
    for s in $steps; do
        say "$t: $s"
        if [[ ! -x $bin ]]; then
            res=missing
            failed=1
        else
            # Not in $(...): steps start agents whose pids cleanup must see.
            set +e
            "step_$s" "$runner" "$bin" "$t" >"$work/msg"
            rc=$?
            set -e
            msg=$(<"$work/msg")
            case $rc in
            0) res=pass ;;
            2) res=skip ;;
            *) res=FAIL; failed=1 ;;
            esac
            [[ -n $msg ]] && printf '    %s\n' "$msg" >&2
            [[ $s == rss && $rc == 0 ]] && res=$(grep -o '[0-9]* kB' <<<"$msg")
        fi
        row+=$(printf ' %-10s' "$res")
    done
    rows+=("$row")
done

echo
hdr=$(printf '%-32s' target)
for s in $steps; do hdr+=$(printf ' %-10s' "$s"); done
echo "$hdr"
printf '%s\n' "${rows[@]}"
((failed == 0)) || { echo "some checks failed; KEEP=1 keeps logs in the work directory"; exit 1; }
