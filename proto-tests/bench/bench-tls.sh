#!/usr/bin/env bash
# TLS benchmark: the same client (nbdcopy URI null:) reading the same
# read-only 4 GiB sparse image (1 GiB of data in 1 MiB runs) from
#   ferry-tls    nbdferry serve --tls=require (client certificates verified)
#   qemu-tls     qemu-nbd with tls-creds-x509 ...,verify-peer=on
#   nbdkit-tls   nbdkit --tls=require --tls-verify-peer file
#   ferry-plain  nbdferry serve without TLS
# Release build; runs alternate between the servers (order rotated each
# round), medians reported. Goal: ferry-tls faster than both peers over TLS
# and within 1.5x of its own plaintext time.
#
# Usage: proto-tests/bench/bench-tls.sh [--runs N] [--no-extents] [--no-build] [--keep]
#   --runs N       timed runs per server and workload (default 3, after 1 warm-up)
#   --no-extents   also time `nbdcopy --no-extents` (all 4 GiB through TLS)
#   --no-build     use the existing target/release/nbdferry
#   --keep         keep the temp dir (image, certificates, logs)
#   NBDFERRY_BIN=path overrides the binary
# Needs: cargo, qemu-utils, nbdkit, libnbd-bin, python3, iproute2 (ss).
set -euo pipefail

RUNS=3
NOEXT=0
BUILD=1
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --no-extents) NOEXT=1; shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ "$RUNS" -ge 1 ] 2>/dev/null || { echo "--runs needs a positive number" >&2; exit 2; }

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="${NBDFERRY_BIN:-$ROOT/target/release/nbdferry}"

for t in qemu-nbd nbdkit nbdcopy python3 ss cmp; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p nbdferry)
fi
[ -x "$BIN" ] || { echo "no release binary at $BIN" >&2; exit 1; }

WORK="$(mktemp -d /tmp/nbdferry-bench-tls.XXXXXX)"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IMG="$WORK/img4g.raw"
python3 "$HERE/mk-image.py" "$IMG" >&2
VSIZE=$(stat -c %s "$IMG")
PKI="$WORK/pki"
"$BIN" certs init "$PKI" >/dev/null

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# No probe connections: a probe would count as a client (and fail TLS).
wait_listen() { # port pid
    for _ in $(seq 400); do
        ss -Hltn "sport = :$1" | grep -q . && return 0
        kill -0 "$2" 2>/dev/null || { echo "server $2 died" >&2; return 1; }
        sleep 0.05
    done
    echo "port $1 not listening" >&2
    return 1
}

# start_ferry NAME ARGS... -> sets PORT
start_ferry() {
    local name="$1" line pid
    shift
    "$BIN" serve --read-only --listen 127.0.0.1:0 --state-dir "$WORK/state-$name" "$@" "$IMG" \
        2>"$WORK/$name.log" &
    pid=$!
    PIDS+=("$pid")
    PORT=""
    for _ in $(seq 400); do
        line=$(grep -m1 '^listening on ' "$WORK/$name.log" || true)
        if [ -n "$line" ]; then
            PORT=$(sed -E 's/^listening on 127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")
            break
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; exit 1; }
        sleep 0.05
    done
    [ -n "$PORT" ] || { echo "$name not ready" >&2; cat "$WORK/$name.log" >&2; exit 1; }
}

declare -A URI SPID
TLSQ="?tls-certificates=$PKI"

start_ferry ferry-tls --tls=require --tls-creds "$PKI"
URI[ferry-tls]="nbds://127.0.0.1:$PORT/$TLSQ"
SPID[ferry-tls]=${PIDS[-1]}

start_ferry ferry-plain
URI[ferry-plain]="nbd://127.0.0.1:$PORT/"
SPID[ferry-plain]=${PIDS[-1]}

QPORT=$(free_port)
qemu-nbd -r -t -e 8 -f raw -b 127.0.0.1 -p "$QPORT" \
    --object "tls-creds-x509,id=tls0,endpoint=server,dir=$PKI,verify-peer=on" --tls-creds tls0 \
    "$IMG" 2>"$WORK/qemu-nbd.log" &
PIDS+=("$!")
SPID[qemu-tls]=$!
wait_listen "$QPORT" "$!"
URI[qemu-tls]="nbds://127.0.0.1:$QPORT/$TLSQ"

KPORT=$(free_port)
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$KPORT" \
    --tls=require --tls-certificates="$PKI" --tls-verify-peer \
    file file="$IMG" 2>"$WORK/nbdkit.log" &
PIDS+=("$!")
SPID[nbdkit-tls]=$!
wait_listen "$KPORT" "$!"
URI[nbdkit-tls]="nbds://127.0.0.1:$KPORT/$TLSQ"

SERVERS=(ferry-tls qemu-tls nbdkit-tls ferry-plain)

# Sanity: every server hands out the image, byte for byte (over TLS where
# it is a TLS server), before anything is timed.
for s in "${SERVERS[@]}"; do
    f="$WORK/check.raw"
    rm -f "$f"
    nbdcopy "${URI[$s]}" "$f"
    cmp -s "$f" "$IMG" || { echo "content mismatch from $s" >&2; exit 1; }
    rm -f "$f"
done
# ...and the TLS servers really refuse plaintext.
for s in ferry-tls qemu-tls nbdkit-tls; do
    plain="nbd://127.0.0.1:${URI[$s]#nbds://127.0.0.1:}"
    plain="${plain%%\?*}"
    if nbdcopy "$plain" null: 2>/dev/null; then
        echo "$s served plaintext" >&2
        exit 1
    fi
done

now() { date +%s.%N; }

# run_once WORKLOAD SERVER -> prints elapsed seconds
run_once() {
    local w="$1" u="${URI[$2]}" t0 t1
    t0=$(now)
    case "$w" in
        copy-null) nbdcopy "$u" null: ;;
        copy-null-noext) nbdcopy --no-extents "$u" null: ;;
    esac
    t1=$(now)
    python3 -c "print(f'{$t1 - $t0:.4f}')"
}

median() { python3 -c 'import sys, statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

WORKLOADS=(copy-null)
[ "$NOEXT" = 1 ] && WORKLOADS+=(copy-null-noext)

declare -A RESULT
for w in "${WORKLOADS[@]}"; do
    echo "== $w" >&2
    for s in "${SERVERS[@]}"; do run_once "$w" "$s" >/dev/null; done # warm-up
    declare -A times=()
    n=${#SERVERS[@]}
    for r in $(seq "$RUNS"); do
        for i in $(seq 0 $((n - 1))); do
            s=${SERVERS[$(((i + r - 1) % n))]}
            t=$(run_once "$w" "$s")
            echo "   run $r $s: ${t}s" >&2
            times[$s]="${times[$s]:-} $t"
        done
    done
    for s in "${SERVERS[@]}"; do
        # shellcheck disable=SC2086
        RESULT[$w,$s]=$(median ${times[$s]})
    done
    unset times
done

hwm() { awk '/^VmHWM/ {print $2 " " $3}' "/proc/$1/status"; }

ARGS=("$VSIZE" "$RUNS")
for w in "${WORKLOADS[@]}"; do
    ARGS+=("$w")
    for s in "${SERVERS[@]}"; do ARGS+=("${RESULT[$w,$s]}"); done
done
ARGS+=(--)
for s in "${SERVERS[@]}"; do ARGS+=("$(hwm "${SPID[$s]}")"); done

python3 - "${ARGS[@]}" <<'EOF'
import sys
a = sys.argv[1:]
vsize, runs = int(a[0]), int(a[1])
a = a[2:]
servers = ["ferry-tls", "qemu-tls", "nbdkit-tls", "ferry-plain"]
cmd = {"copy-null": "nbdcopy URI null:", "copy-null-noext": "nbdcopy --no-extents URI null:"}
sep = a.index("--")
rows, rest = a[:sep], a[sep + 1:]
print(f"\nmedian of {runs} alternating runs; MB/s = {vsize / 2**30:.0f} GiB virtual size / time (MB = 10^6 B)")
print(f"{'workload':30} " + " ".join(f"{s:>18}" for s in servers))
ok = True
for i in range(0, len(rows), 5):
    w = rows[i]
    t = dict(zip(servers, map(float, rows[i + 1:i + 5])))
    print(f"{cmd[w]:30} " + " ".join(f"{t[s]:7.3f}s {vsize / t[s] / 1e6:6.0f}MB/s" for s in servers))
    f = t["ferry-tls"]
    vq, vk, vp = t["qemu-tls"] / f, t["nbdkit-tls"] / f, f / t["ferry-plain"]
    print(f"{'':30} ferry-tls vs qemu-tls {vq:.2f}x faster, vs nbdkit-tls {vk:.2f}x faster, "
          f"TLS/plain time {vp:.2f}x")
    if w == "copy-null":
        ok = vq > 1 and vk > 1 and vp <= 1.5
print(f"{'peak RSS (VmHWM)':30} " + " ".join(f"{x:>18}" for x in rest))
print("goal (copy-null): faster than qemu-tls and nbdkit-tls, TLS within 1.5x of plaintext: "
      + ("MET" if ok else "NOT MET"))
EOF
