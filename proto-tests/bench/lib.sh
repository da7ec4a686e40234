# Shared pieces of the benchmark scripts in this folder. Sourced, not run:
#   set -euo pipefail
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It sets no shell options itself and every function is safe under
# `set -euo pipefail`: a failure it cannot handle exits the script.
# Defines HERE, ROOT, BIN (the nbdferry under test), BIN_OLD and PIDS.

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "lib.sh is sourced by the bench-*.sh scripts, not run" >&2
    exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="${NBDFERRY_BIN:-$ROOT/target/release/nbdferry}"
# A previous release to compare $BIN with, run by run in the same
# benchmark: set by the scripts that take --compare OLD_BIN.
BIN_OLD=""

# Every script takes --runs N, --no-build, --keep and -h/--help, and a few
# options of its own; one parser keeps their spelling and errors alike.
# bench_parse_args HELP_END SPEC... -- ARGS...
#   HELP_END  --help prints lines 2..HELP_END of the script (its header)
#   SPEC      "--opt=VAR": the option takes a value into VAR;
#             "--opt+VAR": a flag that sets VAR=1
# Sets RUNS, BUILD (1 unless --no-build), KEEP; the caller sets defaults.
bench_parse_args() {
    local help_end="$1" spec name var
    local -A takes=() flag=()
    shift
    while [ "$1" != -- ]; do
        case "$1" in
            *=*) takes[${1%%=*}]="${1#*=}" ;;
            *+*) flag[${1%%+*}]="${1#*+}" ;;
        esac
        shift
    done
    shift
    BUILD=1
    KEEP=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --runs) RUNS="$2"; shift 2 ;;
            --no-build) BUILD=0; shift ;;
            --keep) KEEP=1; shift ;;
            -h|--help) sed -n "2,${help_end}p" "$0"; exit 0 ;;
            *)
                if [ -n "$1" ] && [ -n "${takes[$1]:-}" ]; then
                    printf -v "${takes[$1]}" '%s' "$2"
                    shift 2
                elif [ -n "$1" ] && [ -n "${flag[$1]:-}" ]; then
                    printf -v "${flag[$1]}" '%s' 1
                    shift
                else
                    echo "unknown argument: $1" >&2
                    exit 2
                fi
                ;;
        esac
    done
}

# A missing peer tool should fail up front, not after minutes of setup.
bench_need_tools() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
    done
}

# The numbers are only meaningful for an optimised build: build it unless
# --no-build, and insist that $BIN (and $BIN_OLD if given) exists either way.
bench_build() {
    if [ "$BUILD" = 1 ]; then
        (cd "$ROOT" && cargo build --release -p nbdferry)
    fi
    [ -x "$BIN" ] || { echo "no release binary at $BIN" >&2; exit 1; }
    if [ -n "$BIN_OLD" ] && [ ! -x "$BIN_OLD" ]; then
        echo "no binary to compare with at $BIN_OLD" >&2
        exit 1
    fi
}

# Servers started by the script (stopped at exit) and temp dirs (removed
# at exit unless --keep): a benchmark must not leave a server running or
# gigabytes in /tmp or /dev/shm behind, even when it fails or is
# interrupted.
PIDS=()
BENCH_DIRS=()
BENCH_KEPT_NOTE=()

# bench_tmpdir VAR TEMPLATE [unnamed]: mktemp -d into VAR, removed at exit
# unless --keep. "unnamed" leaves it out of the "kept ..." line (the
# server benchmark has always named only its work dir there).
bench_tmpdir() {
    local d
    d="$(mktemp -d "$2")"
    printf -v "$1" '%s' "$d"
    BENCH_DIRS+=("$d")
    if [ "${3:-}" != unnamed ]; then BENCH_KEPT_NOTE+=("$d"); fi
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

# bench_stop PID: TERM, up to 5 s for a clean exit, then KILL; and forget
# the pid, so that cleanup never signals a pid the system has reused.
bench_stop() {
    local p keep=()
    bench_stop_pids "$1"
    for p in "${PIDS[@]}"; do
        if [ "$p" != "$1" ]; then keep+=("$p"); fi
    done
    PIDS=("${keep[@]}")
}

# bench_stop_pids PID...: TERM them all first, so they shut down in
# parallel, then wait for each (KILL after 5 s).
bench_stop_pids() {
    local p
    for p in "$@"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "$@"; do
        for _ in $(seq 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}

# Loop-mounted file systems (bench_mount_xfs), as MOUNT_POINT:DEVICE:
# unmounted and detached at exit, before the temp dirs go.
BENCH_MOUNTS=()

# bench_mount_xfs VAR DIR SIZE: an XFS with reflinks (mkfs.xfs -m
# reflink=1) of SIZE bytes on a sparse file in DIR (a bench_tmpdir),
# loop-mounted (direct I/O, so the backing file's page cache does not
# double the image's) at DIR/xfs, whose path goes into VAR. Needs root.
bench_mount_xfs() {
    local img="$2/xfs.img" mnt="$2/xfs" dev
    truncate -s "$3" "$img"
    mkfs.xfs -q -m reflink=1 "$img"
    dev=$(losetup --find --show --direct-io=on "$img")
    mkdir -p "$mnt"
    BENCH_MOUNTS+=("$mnt:$dev")
    mount "$dev" "$mnt"
    printf -v "$1" '%s' "$mnt"
}

# The EXIT trap (set by bench_tmpdir).
bench_cleanup() {
    local m
    bench_stop_pids "${PIDS[@]}"
    for m in "${BENCH_MOUNTS[@]}"; do
        umount "${m%%:*}" 2>/dev/null || umount -l "${m%%:*}" || true
        losetup -d "${m##*:}" || true
    done
    if [ "$KEEP" = 1 ]; then
        echo "kept ${BENCH_KEPT_NOTE[*]}" >&2
    else
        rm -rf "${BENCH_DIRS[@]}"
    fi
}

# The 4 GiB sparse image of mk-image.py (1 GiB of data in 1 MiB runs, or
# $1 MiB) in $WORK (or $IMAGE_AT): the same input for every server and
# client compared.
# Sets IMG and VSIZE (its size in bytes).
bench_make_image() {
    IMG="${IMAGE_AT:-$WORK}/img4g.raw"
    python3 "$HERE/mk-image.py" "$IMG" --runs "${1:-1024}" >&2
    VSIZE=$(stat -c %s "$IMG")
    # Bytes of data (allocated): what a sparse-aware copy reads.
    DSIZE=$(($(stat -c '%b * %B' "$IMG")))
}

# A port nothing listens on now, for servers that cannot report the port
# they bound (qemu-nbd, nbdkit).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_listen PORT PID: wait until the server listens. It watches the
# listening socket with ss instead of connecting: a probe connection would
# end a non-persistent qemu-nbd, count as a client, and fail TLS.
wait_listen() {
    for _ in $(seq 400); do
        ss -Hltn "sport = :$1" | grep -q . && return 0
        kill -0 "$2" 2>/dev/null || { echo "server $2 died" >&2; return 1; }
        sleep 0.05
    done
    echo "port $1 not listening" >&2
    return 1
}

# bench_start_ferry NAME LOG SERVE-ARGS...: runs `$BIN SERVE-ARGS...` (which
# should listen on port 0 of one address) with stderr to LOG, and reads the
# port it bound from its "listening on" line, which avoids racing for a free
# port. Prefixed with BENCH_EXEC (e.g. `ip netns exec NS`) when set.
# Sets SERVER_PID and PORT; exits (showing the log) if it does not start.
# `BIN=$BIN_OLD bench_start_ferry ...` starts the binary compared with.
bench_start_ferry() {
    local name="$1" log="$2" line
    shift 2
    "${BENCH_EXEC[@]}" "$BIN" "$@" 2>"$log" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    PORT=""
    for _ in $(seq 400); do
        line=$(grep -m1 '^listening on ' "$log" || true)
        if [ -n "$line" ]; then
            PORT=$(sed -E 's/^listening on [^ ,]*:([0-9]+).*/\1/' <<<"$line")
            break
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.05
    done
    [ -n "$PORT" ] || { echo "$name not ready" >&2; cat "$log" >&2; exit 1; }
}

BENCH_EXEC=()

# bench_two_hosts TAG RATE: two network namespaces, NS_A (10.203.0.1) and
# NS_B (10.203.0.2), joined by a veth pair shaped with `tc tbf` at RATE (a
# tc rate: 1gbit, 200mbit) both ways, with a burst of a few ms at the rate,
# as a real link's queue drains. Deleted at exit. Needs root, ip and tc.
bench_two_hosts() {
    local side ns dev addr
    bench_need_tools ip tc
    [ "$(id -u)" = 0 ] || { echo "two hosts need root (network namespaces)" >&2; exit 2; }
    NS_A="$1-a-$$"
    NS_B="$1-b-$$"
    trap 'ip netns del "$NS_A" 2>/dev/null; ip netns del "$NS_B" 2>/dev/null' EXIT
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "nfb$$a" netns "$NS_A" type veth peer name "nfb$$b" netns "$NS_B"
    for side in "$NS_A nfb$$a 10.203.0.1" "$NS_B nfb$$b 10.203.0.2"; do
        read -r ns dev addr <<<"$side"
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$addr/24" dev "$dev"
        ip -n "$ns" link set "$dev" up
        ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$2" burst 1mb latency 20ms
    done
}

# bench_start_qemu LOG QEMU-NBD-ARGS...: qemu-nbd, persistent, 8
# connections, raw, on a free 127.0.0.1 port, stderr appended to LOG.
# Sets SERVER_PID and PORT.
bench_start_qemu() {
    local log="$1"
    shift
    PORT=$(free_port)
    qemu-nbd -t -e 8 -f raw -b 127.0.0.1 -p "$PORT" "$@" 2>>"$log" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_listen "$PORT" "$SERVER_PID"
}

# bench_check_served URI NAME FILE: a full copy of URI (via FILE) equals
# the image, so that no number comes from a server serving wrong data.
bench_check_served() {
    rm -f "$3"
    nbdcopy "$1" "$3"
    cmp -s "$3" "$IMG" || { echo "content mismatch from $2" >&2; exit 1; }
    rm -f "$3"
}

now() { date +%s.%N; }

# elapsed T0 T1: seconds between two `now` stamps, as every table expects
# them (4 decimals).
elapsed() { python3 -c "print(f'{$2 - $1:.4f}')"; }

# Runs are few and noisy: every table reports medians.
median() { python3 -c 'import sys, statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

# Every timed run of bench_time_servers, as SAMPLES[WORKLOAD,SERVER]="t1 t2 ...".
declare -A SAMPLES=()
# The pid of each server (SPID[SERVER]=PID), where the caller records it:
# bench_time_servers then also measures the server's CPU time per run,
# as CPU[WORKLOAD,SERVER] (median seconds).
declare -A SPID=() CPU=()
CLK_TCK=$(getconf CLK_TCK)

# cpu_ticks PID: user + system time of a process, all threads, in ticks.
# (Fields 14 and 15 of /proc/PID/stat; the name field of our servers has
# no spaces.)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# bench_time_servers WORKLOAD ROTATE: the alternating runs of the server
# benchmarks, so that drift hits every server alike. One untimed warm-up
# `run_once WORKLOAD SERVER` per server, then RUNS rounds over SERVERS
# (ROTATE=1: each round starts one server later), each time logged;
# sets RESULT[WORKLOAD,SERVER] to the median and SAMPLES[WORKLOAD,SERVER].
# The caller defines run_once (prints seconds), SERVERS and RESULT.
bench_time_servers() {
    local w="$1" rotate="$2" n=${#SERVERS[@]} r i s t c0
    local -A times=() cpus=()
    for s in "${SERVERS[@]}"; do run_once "$w" "$s" >/dev/null; done # warm-up
    for r in $(seq "$RUNS"); do
        for i in $(seq 0 $((n - 1))); do
            if [ "$rotate" = 1 ]; then
                s=${SERVERS[$(((i + r - 1) % n))]}
            else
                s=${SERVERS[$i]}
            fi
            c0=""
            if [ -n "${SPID[$s]:-}" ]; then c0=$(cpu_ticks "${SPID[$s]}"); fi
            t=$(run_once "$w" "$s")
            if [ -n "$c0" ]; then
                cpus[$s]="${cpus[$s]:-} $(($(cpu_ticks "${SPID[$s]}") - c0))"
            fi
            echo "   run $r $s: ${t}s" >&2
            times[$s]="${times[$s]:-} $t"
        done
    done
    for s in "${SERVERS[@]}"; do
        # shellcheck disable=SC2086
        RESULT[$w,$s]=$(median ${times[$s]:-})
        SAMPLES[$w,$s]="${times[$s]# }"
        if [ -n "${cpus[$s]:-}" ]; then
            # shellcheck disable=SC2086
            CPU[$w,$s]=$(python3 -c "print($(median ${cpus[$s]}) / $CLK_TCK)")
        fi
    done
}

# bench_compare_table ROW...: the --compare report of $BIN_OLD against $BIN.
#   ROW  "NAME|UNIT|OLD SAMPLES|NEW SAMPLES"; UNIT s is a time (lower is
#        better), any other a rate (higher is better)
# new/old compares the medians as speeds (> 1: the new binary is faster);
# spread is (max - min) / median of each binary's runs.
bench_compare_table() {
    python3 - "$BIN_OLD" "$BIN" "$@" <<'EOF'
import statistics, sys
old_bin, new_bin, rows = sys.argv[1], sys.argv[2], sys.argv[3:]
print(f"\nold = {old_bin}\nnew = {new_bin}")
print(f"{'workload':36} {'old':>12} {'new':>12} {'new/old':>8} {'spread old/new':>15}")
spread = lambda xs: (max(xs) - min(xs)) / statistics.median(xs)
for row in rows:
    name, unit, old, new = row.split("|")
    old, new = [float(x) for x in old.split()], [float(x) for x in new.split()]
    o, n = statistics.median(old), statistics.median(new)
    ratio = o / n if unit == "s" else n / o
    spreads = f"{spread(old):.0%}/{spread(new):.0%}"
    f = (lambda v: f"{v:.3f} s") if unit == "s" else (lambda v: f"{v:.0f} {unit}")
    print(f"{name:36} {f(o):>12} {f(n):>12} {ratio:8.3f} {spreads:>15}"
          + ("" if ratio >= 0.97 else "  < 0.97"))
print("new/old = new speed / old speed, of the medians (goal >= 0.97)")
EOF
}

# hwm PID: peak resident memory of a (still running) server, e.g. "12345 kB".
hwm() { awk '/^VmHWM/ {print $2 " " $3}' "/proc/$1/status"; }
