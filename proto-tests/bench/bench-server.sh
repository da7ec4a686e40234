#!/usr/bin/env bash
# Server benchmark: nbdferry (release build) vs qemu-nbd serving the same
# read-only 4 GiB sparse image (1 GiB of data in 1 MiB runs), same clients,
# runs alternated between the two servers.
#
# Usage: proto-tests/bench/bench-server.sh [--runs N] [--fio-runtime S] [--no-build] [--keep]
#   --runs N          timed runs per workload and server (default 3, after 1 warm-up)
#   --fio-runtime S   seconds per fio run (default 10)
#   --no-build        use the existing target/release/nbdferry
#   --keep            keep the temp dir (image, logs, fio json)
#   NBDFERRY_BIN=path overrides the binary (implies nothing about --no-build)
# Needs: cargo, qemu-utils, libnbd-bin, fio, python3, iproute2 (ss).
set -euo pipefail

RUNS=3
FIO_RUNTIME=10
BUILD=1
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --fio-runtime) FIO_RUNTIME="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="${NBDFERRY_BIN:-$ROOT/target/release/nbdferry}"

for t in qemu-nbd qemu-img nbdcopy fio python3 ss; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p nbdferry)
fi
[ -x "$BIN" ] || { echo "no release binary at $BIN" >&2; exit 1; }

WORK="$(mktemp -d /tmp/nbdferry-bench.XXXXXX)"
# Copies land on tmpfs: the benchmark measures the servers, not the
# writeback of the previous run's output.
OUT="$(mktemp -d /dev/shm/nbdferry-bench-out.XXXXXX)"
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
        rm -rf "$OUT"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IMG="$WORK/img4g.raw"
python3 "$HERE/mk-image.py" "$IMG" >&2
VSIZE=$(stat -c %s "$IMG")

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_listen() { # port pid
    for _ in $(seq 400); do
        ss -Hltn "sport = :$1" | grep -q . && return 0
        kill -0 "$2" 2>/dev/null || { echo "server $2 died" >&2; return 1; }
        sleep 0.05
    done
    echo "port $1 not listening" >&2
    return 1
}

# --- nbdferry ---------------------------------------------------------------
"$BIN" serve --read-only --listen 127.0.0.1:0 "$IMG" 2>"$WORK/nbdferry.log" &
FERRY_PID=$!
PIDS+=("$FERRY_PID")
FERRY_PORT=""
for _ in $(seq 400); do
    line=$(grep -m1 '^listening on ' "$WORK/nbdferry.log" || true)
    if [ -n "$line" ]; then
        FERRY_PORT=$(sed -E 's/^listening on 127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")
        break
    fi
    kill -0 "$FERRY_PID" 2>/dev/null || { cat "$WORK/nbdferry.log" >&2; exit 1; }
    sleep 0.05
done
[ -n "$FERRY_PORT" ] || { echo "nbdferry not ready" >&2; cat "$WORK/nbdferry.log" >&2; exit 1; }

# --- qemu-nbd ---------------------------------------------------------------
QEMU_PORT=$(free_port)
qemu-nbd -r -t -e 8 -f raw -b 127.0.0.1 -p "$QEMU_PORT" "$IMG" 2>"$WORK/qemu-nbd.log" &
QEMU_PID=$!
PIDS+=("$QEMU_PID")
wait_listen "$QEMU_PORT" "$QEMU_PID"

declare -A URI=([ferry]="nbd://127.0.0.1:$FERRY_PORT/" [qemu]="nbd://127.0.0.1:$QEMU_PORT/")
SERVERS=(ferry qemu)

now() { date +%s.%N; }

# run_once WORKLOAD SERVER -> prints elapsed seconds
run_once() {
    local w="$1" s="$2" u="${URI[$2]}" t0 t1
    rm -f "$OUT/sparse-out.raw" "$OUT/out.raw"
    t0=$(now)
    case "$w" in
        copy-null) nbdcopy "$u" null: >/dev/null ;;
        copy-sparse) nbdcopy "$u" "$OUT/sparse-out.raw" >/dev/null ;;
        qemu-img-convert) qemu-img convert -f raw -O raw "$u" "$OUT/out.raw" >/dev/null ;;
    esac
    t1=$(now)
    python3 -c "print(f'{$t1 - $t0:.4f}')"
}

median() { python3 -c 'import sys, statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

declare -A RESULT
for w in copy-null copy-sparse qemu-img-convert; do
    echo "== $w" >&2
    for s in "${SERVERS[@]}"; do run_once "$w" "$s" >/dev/null; done # warm-up
    declare -A times=([ferry]="" [qemu]="")
    for r in $(seq "$RUNS"); do
        for s in "${SERVERS[@]}"; do
            t=$(run_once "$w" "$s")
            echo "   run $r $s: ${t}s" >&2
            times[$s]="${times[$s]} $t"
        done
    done
    for s in "${SERVERS[@]}"; do
        # shellcheck disable=SC2086
        RESULT[$w,$s]=$(median ${times[$s]})
    done
    # Sanity: the copies are byte-identical to the image.
    if [ "$w" != copy-null ]; then
        for s in "${SERVERS[@]}"; do
            f="$WORK/check-$s.raw"
            rm -f "$f"
            nbdcopy "${URI[$s]}" "$f"
            cmp -s "$f" "$IMG" || { echo "content mismatch from $s" >&2; exit 1; }
            rm -f "$f"
        done
    fi
    unset times
done

echo "== fio randread 4k QD32 (${FIO_RUNTIME}s per run)" >&2
declare -A IOPS=([ferry]="" [qemu]="")
for r in $(seq "$RUNS"); do
    for s in "${SERVERS[@]}"; do
        out="$WORK/fio-$s-$r.json"
        fio --name=rr --ioengine=nbd --uri="${URI[$s]}" --rw=randread --bs=4k \
            --iodepth=32 --runtime="$FIO_RUNTIME" --time_based \
            --output-format=json --output="$out" >/dev/null
        i=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' "$out")
        echo "   run $r $s: $i IOPS" >&2
        IOPS[$s]="${IOPS[$s]} $i"
    done
done
# shellcheck disable=SC2086
RESULT[fio,ferry]=$(median ${IOPS[ferry]})
# shellcheck disable=SC2086
RESULT[fio,qemu]=$(median ${IOPS[qemu]})

hwm() { awk '/^VmHWM/ {print $2 " " $3}' "/proc/$1/status"; }
FERRY_HWM=$(hwm "$FERRY_PID")
QEMU_HWM=$(hwm "$QEMU_PID")

python3 - "$VSIZE" "$RUNS" \
    "${RESULT[copy-null,ferry]}" "${RESULT[copy-null,qemu]}" \
    "${RESULT[copy-sparse,ferry]}" "${RESULT[copy-sparse,qemu]}" \
    "${RESULT[qemu-img-convert,ferry]}" "${RESULT[qemu-img-convert,qemu]}" \
    "${RESULT[fio,ferry]}" "${RESULT[fio,qemu]}" \
    "$FERRY_HWM" "$QEMU_HWM" <<'EOF'
import sys
a = sys.argv[1:]
vsize, runs = int(a[0]), int(a[1])
rows = [("nbdcopy URI null:", float(a[2]), float(a[3])),
        ("nbdcopy URI sparse-out.raw", float(a[4]), float(a[5])),
        ("qemu-img convert URI out.raw", float(a[6]), float(a[7]))]
fio_f, fio_q = float(a[8]), float(a[9])
print(f"\nmedian of {runs} alternating runs; MB/s = {vsize / 2**30:.0f} GiB virtual size / time (MB = 10^6 B)")
print(f"{'workload':32} {'nbdferry':>20} {'qemu-nbd':>20} {'ratio':>7}")
for name, f, q in rows:
    print(f"{name:32} {f:7.3f}s {vsize / f / 1e6:7.0f}MB/s {q:7.3f}s {vsize / q / 1e6:7.0f}MB/s {q / f:7.2f}")
print(f"{'fio randread 4k QD32':32} {fio_f:14.0f} IOPS {fio_q:14.0f} IOPS {fio_f / fio_q:7.2f}")
print(f"{'peak RSS (VmHWM)':32} {a[10]:>20} {a[11]:>20}")
print("ratio = nbdferry speed / qemu-nbd speed (>1: nbdferry is faster)")
EOF
