#!/usr/bin/env bash
# Server benchmark: nbdferry (release build) vs qemu-nbd and nbdkit (file
# plugin) serving the same read-only 4 GiB sparse image (1 GiB of data in
# 1 MiB runs; see --dense), same clients, runs alternated between the servers (order
# rotated each round). A fourth server is the same nbdferry with
# --no-zero-copy, which shows what sending cached data with sendfile is
# worth. Every figure comes with the server's CPU time per GiB of data
# read (utime + stime from /proc/PID/stat around each run).
#
# Usage: proto-tests/bench/bench-server.sh [--runs N] [--fio-runtime S] [--compare OLD_BIN]
#        [--image-dir DIR] [--dense] [--no-build] [--keep]
#   --runs N          timed runs per workload and server (default 3, after 1 warm-up)
#   --fio-runtime S   seconds per fio run, QD1 and QD32 (default 10)
#   --image-dir DIR   make the image in DIR (default: the temp dir under
#                     /tmp); /dev/shm serves it from tmpfs, where looking
#                     for holes costs a walk over the pages
#   --dense           a fully allocated image (4 GiB of data, no holes): a
#                     VM's preallocated disk. With --image-dir /dev/shm it
#                     needs 8 GiB of tmpfs (the image and one copy)
#   --compare OLD_BIN also serve with OLD_BIN (say, the previous release) as a
#                     third server in every round, rounds rotated, and report
#                     new/old for every figure
#   --no-build        use the existing target/release/nbdferry
#   --keep            keep the temp dir (image, logs, fio json)
#   NBDFERRY_BIN=path overrides the binary (implies nothing about --no-build)
# Needs: cargo, qemu-utils, nbdkit, libnbd-bin, fio, python3, iproute2 (ss).
set -euo pipefail

# shellcheck source=proto-tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
FIO_RUNTIME=10
IMAGE_DIR=
DENSE=
bench_parse_args 26 --fio-runtime=FIO_RUNTIME --compare=BIN_OLD --image-dir=IMAGE_DIR \
    --dense+DENSE -- "$@"
bench_need_tools qemu-nbd qemu-img nbdkit nbdcopy fio python3 ss
bench_build

bench_tmpdir WORK /tmp/nbdferry-bench.XXXXXX
# Copies land on tmpfs: the benchmark measures the servers, not the
# writeback of the previous run's output.
bench_tmpdir OUT /dev/shm/nbdferry-bench-out.XXXXXX unnamed
if [ -n "$IMAGE_DIR" ]; then
    bench_tmpdir IMAGE_AT "$IMAGE_DIR/nbdferry-bench-img.XXXXXX"
fi
bench_make_image "${DENSE:+4096}"

# --- nbdferry, with and without zero-copy replies --------------------------
bench_start_ferry nbdferry "$WORK/nbdferry.log" serve --read-only --listen 127.0.0.1:0 "$IMG"
SPID[ferry]=$SERVER_PID
declare -A URI=([ferry]="nbd://127.0.0.1:$PORT/")
bench_start_ferry nbdferry-copy "$WORK/nbdferry-copy.log" serve --read-only --no-zero-copy \
    --listen 127.0.0.1:0 "$IMG"
SPID[ferry-copy]=$SERVER_PID
URI[ferry-copy]="nbd://127.0.0.1:$PORT/"
if [ -n "$BIN_OLD" ]; then
    BIN=$BIN_OLD bench_start_ferry nbdferry-old "$WORK/nbdferry-old.log" \
        serve --read-only --listen 127.0.0.1:0 "$IMG"
    SPID[ferry-old]=$SERVER_PID
    URI[ferry-old]="nbd://127.0.0.1:$PORT/"
fi

# --- qemu-nbd and nbdkit ----------------------------------------------------
bench_start_qemu "$WORK/qemu-nbd.log" -r "$IMG"
SPID[qemu]=$SERVER_PID
URI[qemu]="nbd://127.0.0.1:$PORT/"
KPORT=$(free_port)
nbdkit -f --exit-with-parent -r -i 127.0.0.1 -p "$KPORT" file file="$IMG" 2>"$WORK/nbdkit.log" &
PIDS+=("$!")
SPID[nbdkit]=$!
wait_listen "$KPORT" "$!"
URI[nbdkit]="nbd://127.0.0.1:$KPORT/"

SERVERS=(ferry ferry-copy qemu nbdkit)
if [ -n "$BIN_OLD" ]; then SERVERS=(ferry-old "${SERVERS[@]}"); fi

# run_once WORKLOAD SERVER -> prints elapsed seconds
run_once() {
    local w="$1" u="${URI[$2]}" t0 t1
    rm -f "$OUT/sparse-out.raw" "$OUT/out.raw"
    t0=$(now)
    case "$w" in
        copy-null) nbdcopy "$u" null: >/dev/null ;;
        copy-sparse) nbdcopy "$u" "$OUT/sparse-out.raw" >/dev/null ;;
        qemu-img-convert) qemu-img convert -f raw -O raw "$u" "$OUT/out.raw" >/dev/null ;;
        fio-qd1 | fio-qd32)
            fio --name=rr --ioengine=nbd --uri="$u" --rw=randread --bs=4k \
                --iodepth="${w#fio-qd}" --runtime="$FIO_RUNTIME" --time_based \
                --output-format=json --output="$WORK/fio-$w-$2.json" >/dev/null
            ;;
    esac
    t1=$(now)
    elapsed "$t0" "$t1"
}

# iops WORKLOAD SERVER: of the last fio run.
iops() {
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' \
        "$WORK/fio-$1-$2.json"
}

# Sanity: every server hands out the image, byte for byte.
for s in "${SERVERS[@]}"; do
    bench_check_served "${URI[$s]}" "$s" "$WORK/check-$s.raw"
done

declare -A RESULT
WORKLOADS=(copy-null copy-sparse qemu-img-convert)
for w in "${WORKLOADS[@]}"; do
    echo "== $w" >&2
    bench_time_servers "$w" 1
done

# fio runs a fixed time: its figure is IOPS, recorded per run here.
for w in fio-qd1 fio-qd32; do
    echo "== $w randread 4k (${FIO_RUNTIME}s per run)" >&2
    declare -A IOPS=() FCPU=()
    for r in $(seq "$RUNS"); do
        for k in "${!SERVERS[@]}"; do
            s=${SERVERS[$(((k + r - 1) % ${#SERVERS[@]}))]}
            c0=$(cpu_ticks "${SPID[$s]}")
            run_once "$w" "$s" >/dev/null
            FCPU[$s]="${FCPU[$s]:-} $(($(cpu_ticks "${SPID[$s]}") - c0))"
            i=$(iops "$w" "$s")
            echo "   run $r $s: $i IOPS" >&2
            IOPS[$s]="${IOPS[$s]:-} $i"
        done
    done
    for s in "${SERVERS[@]}"; do
        # shellcheck disable=SC2086
        RESULT[$w,$s]=$(median ${IOPS[$s]})
        SAMPLES[$w,$s]="${IOPS[$s]# }"
        # shellcheck disable=SC2086
        CPU[$w,$s]=$(python3 -c "print($(median ${FCPU[$s]}) / $CLK_TCK)")
    done
    unset IOPS FCPU
done

ARGS=("$VSIZE" "$DSIZE" "$RUNS" "$FIO_RUNTIME" "${SERVERS[*]}")
for w in "${WORKLOADS[@]}" fio-qd1 fio-qd32; do
    for s in "${SERVERS[@]}"; do ARGS+=("$w" "$s" "${RESULT[$w,$s]}" "${CPU[$w,$s]}"); done
done
ARGS+=(--)
for s in "${SERVERS[@]}"; do ARGS+=("$s" "$(hwm "${SPID[$s]}")"); done

python3 - "${ARGS[@]}" <<'EOF'
import sys
a = sys.argv[1:]
vsize, dsize, runs, fio_s, servers = int(a[0]), int(a[1]), int(a[2]), float(a[3]), a[4].split()
sep = a.index("--")
rows, rest = a[5:sep], a[sep + 1:]
rss = dict(zip(rest[::2], rest[1::2]))
res, cpu = {}, {}
for i in range(0, len(rows), 4):
    res[rows[i], rows[i + 1]], cpu[rows[i], rows[i + 1]] = float(rows[i + 2]), float(rows[i + 3])
gib = dsize / 2**30
names = {"copy-null": "nbdcopy URI null:", "copy-sparse": "nbdcopy URI sparse-out.raw",
         "qemu-img-convert": "qemu-img convert URI out.raw",
         "fio-qd1": "fio randread 4k QD1", "fio-qd32": "fio randread 4k QD32"}
print(f"\nmedian of {runs} rotated runs; MB/s = {vsize / 2**30:.0f} GiB virtual size / time "
      f"(MB = 10^6 B); cpu = server CPU s per GiB of data read ({gib:.2f} GiB per copy)")
print(f"{'workload':30} " + " ".join(f"{s:>25}" for s in servers))
for w, name in names.items():
    cells = []
    for s in servers:
        v, c = res[w, s], cpu[w, s]
        if w.startswith("fio"):
            cells.append(f"{v:8.0f} IOPS cpu {c / (v * fio_s * 4096 / 2**30):5.1f}")
        else:
            cells.append(f"{v:6.3f}s {vsize / v / 1e6:5.0f}MB/s cpu {c / gib:4.2f}")
    print(f"{name:30} " + " ".join(f"{x:>25}" for x in cells))
def speed(w, s):
    return res[w, s] if w.startswith("fio") else 1 / res[w, s]
print("\nspeed ratios (>1: nbdferry faster):")
for w, name in names.items():
    print(f"  {name:30} vs nbdkit {speed(w, 'ferry') / speed(w, 'nbdkit'):5.2f}"
          f"  vs qemu-nbd {speed(w, 'ferry') / speed(w, 'qemu'):5.2f}"
          f"  zero-copy on/off {speed(w, 'ferry') / speed(w, 'ferry-copy'):5.2f}")
print(f"{'peak RSS (VmHWM)':30} " + " ".join(f"{rss[s]:>25}" for s in servers))
print("goals: nbdcopy null >= 1.25x nbdkit; qemu-img convert >= 1.25x qemu-nbd; "
      "server cpu per GiB below both peers'; fio QD1/QD32 not below the peers")
EOF

if [ -n "$BIN_OLD" ]; then
    rows=()
    for w in copy-null:"nbdcopy URI null:" copy-sparse:"nbdcopy URI sparse-out.raw" \
        qemu-img-convert:"qemu-img convert URI out.raw" fio-qd1:"fio randread 4k QD1" \
        fio-qd32:"fio randread 4k QD32"; do
        unit=s
        case "${w%%:*}" in fio*) unit=IOPS ;; esac
        rows+=("${w#*:}|$unit|${SAMPLES[${w%%:*},ferry-old]}|${SAMPLES[${w%%:*},ferry]}")
    done
    bench_compare_table "${rows[@]}"
    echo "peak RSS (VmHWM): old $(hwm "${SPID[ferry-old]}"), new $(hwm "${SPID[ferry]}")"
fi
