#!/usr/bin/env bash
# Client benchmark: `nbdferry copy` (release build) vs `nbdcopy`, both
# against qemu-nbd, on the 4 GiB sparse image of mk-image.py (1 GiB of data
# in 1 MiB runs). Runs alternate between the two clients (A B A B ...).
#
# Cases:
#   read-null   qemu-nbd -r  ->  null:
#   read-file   qemu-nbd -r  ->  new sparse file on /dev/shm (deleted between runs)
#   upload      image        ->  qemu-nbd --discard=unmap on a fresh sparse
#                                target (new file and server for every run)
#
# Usage: proto-tests/bench/bench-client.sh [--runs N] [--cases LIST] [--no-build] [--keep]
#   --runs N       timed runs per case and client (default 5, after 1 warm-up each)
#   --cases LIST   comma-separated subset of read-null,read-file,upload
#   --no-build     use the existing target/release/nbdferry
#   --keep         keep the temp dirs (image, logs)
#   NBDFERRY_BIN=path       binary to run (default target/release/nbdferry)
#   NBDFERRY_COPY_ARGS=...  extra `nbdferry copy` arguments (for tuning)
#   NBDFERRY_BASE_BIN=path  also run this (older) nbdferry build, as a third
#                           client "baseline", to measure a change
# Prints per case and client the median wall time and the median client CPU
# time (user+sys, from /usr/bin/time), and nbdcopy-time / nbdferry-time
# (> 1: nbdferry is faster). Every output is compared with the image once.
# Needs: cargo, qemu-utils, libnbd-bin, python3, iproute2 (ss), /usr/bin/time.
set -euo pipefail

# shellcheck source=proto-tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=5
CASES="read-null,read-file,upload"
bench_parse_args 24 --cases=CASES -- "$@"
read -r -a EXTRA <<<"${NBDFERRY_COPY_ARGS:-}"
bench_need_tools qemu-nbd nbdcopy python3 ss /usr/bin/time
bench_build
BASE_BIN="${NBDFERRY_BASE_BIN:-}"
if [ -n "$BASE_BIN" ]; then
    [ -x "$BASE_BIN" ] || { echo "no baseline binary at $BASE_BIN" >&2; exit 1; }
fi

# The image lives on disk (page cache warm after creation); outputs and
# upload targets go to /dev/shm so that writeback does not add noise.
bench_tmpdir WORK /tmp/nbdferry-bench-client.XXXXXX
bench_tmpdir SHM /dev/shm/nbdferry-bench-client.XXXXXX
UP_PID="" UP_PORT=""
bench_make_image

bench_start_qemu "$WORK/qemu-nbd.log" -r "$IMG"
READ_URI="nbd://127.0.0.1:$PORT/"

TARGET="$SHM/target.raw"
OUT="$SHM/out.raw"

# prepare CASE: untimed setup before a run.
prepare() {
    case "$1" in
        read-file) rm -f "$OUT" "$OUT.part" ;;
        upload)
            if [ -n "$UP_PID" ]; then bench_stop "$UP_PID"; UP_PID=""; fi
            rm -f "$TARGET"
            truncate -s "$VSIZE" "$TARGET"
            bench_start_qemu "$WORK/qemu-nbd.log" --discard=unmap "$TARGET"
            UP_PID=$SERVER_PID UP_PORT=$PORT
            ;;
    esac
}

# command CASE CLIENT -> the argv to time, one word per line.
command_for() {
    local src dst
    case "$1" in
        read-null) src="$READ_URI" dst="null:" ;;
        read-file) src="$READ_URI" dst="$OUT" ;;
        upload) src="$IMG" dst="nbd://127.0.0.1:$UP_PORT/" ;;
    esac
    case "$2" in
        nbdferry) printf '%s\n' "$BIN" copy --progress=none "${EXTRA[@]}" "$src" "$dst" ;;
        baseline) printf '%s\n' "$BASE_BIN" copy --progress=none "$src" "$dst" ;;
        nbdcopy) printf '%s\n' nbdcopy "$src" "$dst" ;;
    esac
}

# run_once CASE CLIENT: sets WALL and CPU (seconds). Not to be run in a
# subshell: prepare() records the upload server's pid for cleanup.
WALL="" CPU=""
run_once() {
    local argv t0 t1
    prepare "$1"
    mapfile -t argv < <(command_for "$1" "$2")
    t0=$(now)
    /usr/bin/time -o "$WORK/time" -f '%U %S' "${argv[@]}" >/dev/null 2>"$WORK/client.err" || {
        echo "$2 failed on $1:" >&2
        cat "$WORK/client.err" >&2
        exit 1
    }
    t1=$(now)
    CPU=$(awk '{print $1 + $2}' "$WORK/time")
    WALL=$(elapsed "$t0" "$t1")
}

# check CASE CLIENT: the copy the last run made equals the image.
check() {
    local f
    case "$1" in
        read-null) return 0 ;;
        read-file) f="$OUT" ;;
        upload)
            bench_stop "$UP_PID"
            UP_PID=""
            f="$TARGET"
            ;;
    esac
    cmp -s "$f" "$IMG" || { echo "content mismatch: $2 on $1" >&2; exit 1; }
    echo "   $2 $1: content ok, $(du -k "$f" | cut -f1) KiB allocated" >&2
}

CLIENTS=(nbdferry nbdcopy)
if [ -n "$BASE_BIN" ]; then CLIENTS+=(baseline); fi
IFS=, read -r -a CASE_LIST <<<"$CASES"
ROWS=()
for c in "${CASE_LIST[@]}"; do
    echo "== $c" >&2
    for k in "${CLIENTS[@]}"; do
        run_once "$c" "$k" # warm-up
        check "$c" "$k"
    done
    declare -A wall=() cpu=()
    for r in $(seq "$RUNS"); do
        for k in "${CLIENTS[@]}"; do
            run_once "$c" "$k"
            echo "   run $r $k: ${WALL}s wall, ${CPU}s cpu" >&2
            wall[$k]="${wall[$k]:-} $WALL"
            cpu[$k]="${cpu[$k]:-} $CPU"
        done
    done
    for k in "${CLIENTS[@]}"; do
        # shellcheck disable=SC2086
        ROWS+=("$c $k $(median ${wall[$k]}) $(median ${cpu[$k]})")
    done
    unset wall cpu
    # Free the memory the last output holds on /dev/shm.
    if [ -n "$UP_PID" ]; then bench_stop "$UP_PID"; UP_PID=""; fi
    rm -f "$OUT" "$TARGET"
done

python3 - "$VSIZE" "$RUNS" "${EXTRA[*]:-}" "${ROWS[@]}" <<'EOF'
import sys
vsize, runs, extra = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print(f"\nmedian of {runs} alternating runs; server qemu-nbd; MB/s = {vsize / 2**30:.0f} GiB virtual size / time (MB = 10^6 B)")
if extra:
    print(f"nbdferry copy extra arguments: {extra}")
res = {}
for row in sys.argv[4:]:
    case, client, w, c = row.split()
    res.setdefault(case, {})[client] = (float(w), float(c))
print(f"{'case':10} {'client':9} {'wall':>8} {'MB/s':>7} {'cpu':>6} {'nbdcopy/nbdferry':>17}")
for case, clients in res.items():
    ferry = clients["nbdferry"][0]
    for client, (w, c) in clients.items():
        ratio = f"{clients['nbdcopy'][0] / ferry:17.2f}" if client == "nbdferry" else ""
        print(f"{case:10} {client:9} {w:7.3f}s {vsize / w / 1e6:7.0f} {c:5.2f}s {ratio}")
print("wall, cpu: medians; cpu = client user+sys; ratio > 1: nbdferry is faster")
EOF
