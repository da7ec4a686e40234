#!/usr/bin/env bash
# Server benchmark: nbdferry (release build) vs qemu-nbd serving the same
# read-only 4 GiB sparse image (1 GiB of data in 1 MiB runs), same clients,
# runs alternated between the two servers.
#
# Usage: proto-tests/bench/bench-server.sh [--runs N] [--fio-runtime S] [--compare OLD_BIN] [--no-build] [--keep]
#   --runs N          timed runs per workload and server (default 3, after 1 warm-up)
#   --fio-runtime S   seconds per fio run (default 10)
#   --compare OLD_BIN also serve with OLD_BIN (say, the previous release) as a
#                     third server in every round, rounds rotated, and report
#                     new/old for every figure
#   --no-build        use the existing target/release/nbdferry
#   --keep            keep the temp dir (image, logs, fio json)
#   NBDFERRY_BIN=path overrides the binary (implies nothing about --no-build)
# Needs: cargo, qemu-utils, libnbd-bin, fio, python3, iproute2 (ss).
set -euo pipefail

# shellcheck source=proto-tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
FIO_RUNTIME=10
bench_parse_args 15 --fio-runtime=FIO_RUNTIME --compare=BIN_OLD -- "$@"
bench_need_tools qemu-nbd qemu-img nbdcopy fio python3 ss
bench_build

bench_tmpdir WORK /tmp/nbdferry-bench.XXXXXX
# Copies land on tmpfs: the benchmark measures the servers, not the
# writeback of the previous run's output.
bench_tmpdir OUT /dev/shm/nbdferry-bench-out.XXXXXX unnamed
bench_make_image

# --- nbdferry ---------------------------------------------------------------
bench_start_ferry nbdferry "$WORK/nbdferry.log" serve --read-only --listen 127.0.0.1:0 "$IMG"
FERRY_PID=$SERVER_PID FERRY_PORT=$PORT
if [ -n "$BIN_OLD" ]; then
    BIN=$BIN_OLD bench_start_ferry nbdferry-old "$WORK/nbdferry-old.log" \
        serve --read-only --listen 127.0.0.1:0 "$IMG"
    OLD_PID=$SERVER_PID OLD_PORT=$PORT
fi

# --- qemu-nbd ---------------------------------------------------------------
bench_start_qemu "$WORK/qemu-nbd.log" -r "$IMG"
QEMU_PID=$SERVER_PID QEMU_PORT=$PORT

declare -A URI=([ferry]="nbd://127.0.0.1:$FERRY_PORT/" [qemu]="nbd://127.0.0.1:$QEMU_PORT/")
SERVERS=(ferry qemu)
ROTATE=0
if [ -n "$BIN_OLD" ]; then
    URI[ferry-old]="nbd://127.0.0.1:$OLD_PORT/"
    SERVERS=(ferry-old ferry qemu)
    ROTATE=1
fi

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
    elapsed "$t0" "$t1"
}

declare -A RESULT
for w in copy-null copy-sparse qemu-img-convert; do
    echo "== $w" >&2
    bench_time_servers "$w" "$ROTATE"
    # Sanity: the copies are byte-identical to the image.
    if [ "$w" != copy-null ]; then
        for s in "${SERVERS[@]}"; do
            bench_check_served "${URI[$s]}" "$s" "$WORK/check-$s.raw"
        done
    fi
done

echo "== fio randread 4k QD32 (${FIO_RUNTIME}s per run)" >&2
declare -A IOPS=()
for r in $(seq "$RUNS"); do
    for k in "${!SERVERS[@]}"; do
        s=${SERVERS[$(((k + (r - 1) * ROTATE) % ${#SERVERS[@]}))]}
        out="$WORK/fio-$s-$r.json"
        fio --name=rr --ioengine=nbd --uri="${URI[$s]}" --rw=randread --bs=4k \
            --iodepth=32 --runtime="$FIO_RUNTIME" --time_based \
            --output-format=json --output="$out" >/dev/null
        i=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' "$out")
        echo "   run $r $s: $i IOPS" >&2
        IOPS[$s]="${IOPS[$s]:-} $i"
    done
done
for s in "${SERVERS[@]}"; do
    # shellcheck disable=SC2086
    RESULT[fio,$s]=$(median ${IOPS[$s]})
    SAMPLES[fio,$s]="${IOPS[$s]# }"
done

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

if [ -n "$BIN_OLD" ]; then
    rows=()
    for w in copy-null:"nbdcopy URI null:" copy-sparse:"nbdcopy URI sparse-out.raw" \
        qemu-img-convert:"qemu-img convert URI out.raw" fio:"fio randread 4k QD32"; do
        unit=s
        if [ "${w%%:*}" = fio ]; then unit=IOPS; fi
        rows+=("${w#*:}|$unit|${SAMPLES[${w%%:*},ferry-old]}|${SAMPLES[${w%%:*},ferry]}")
    done
    bench_compare_table "${rows[@]}"
    echo "peak RSS (VmHWM): old $(hwm "$OLD_PID"), new $FERRY_HWM"
fi
