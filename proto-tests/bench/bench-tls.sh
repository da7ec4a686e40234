#!/usr/bin/env bash
# TLS benchmark: the same client (nbdcopy URI null:) reading the same
# read-only 4 GiB sparse image (1 GiB of data in 1 MiB runs) from
#   ferry-tls    nbdferry serve --tls=require (client certificates verified)
#   qemu-tls     qemu-nbd with tls-creds-x509 ...,verify-peer=on
#   nbdkit-tls   nbdkit --tls=require --tls-verify-peer file
#   ferry-plain  nbdferry serve without TLS
#   nbdkit-plain nbdkit file without TLS (the peer's own TLS/plain ratio)
# Release build; runs alternate between the servers (order rotated each
# round), medians reported, with each server's CPU time per GiB of data.
# Goal: ferry-tls >= 1.1x nbdkit-tls and faster than qemu-tls, with less
# server CPU per GiB than both. (Plaintext nbdferry sends cached data with
# sendfile, so its TLS/plain ratio is no longer a like-for-like figure.)
#
# Two more views of the same servers, because nbdcopy 1.14's own
# allocator decides its time: at every 128 MiB work range it waits for
# block status until every read in flight has been answered; a server
# that has answered them all already (nbdferry answers cached reads at
# once) lets nbdcopy free all 64 read buffers per connection, glibc
# trims the heap and nbdcopy page-faults all of them in again (~120k
# faults against ~25k with nbdkit; sys time +0.15 s):
#   copy-null-notrim  the same nbdcopy with glibc trimming off
#                     (MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_), same for all
#   qemu-convert      qemu-img convert (qemu's own NBD client) into null-co
#
# Usage: proto-tests/bench/bench-tls.sh [--runs N] [--no-extents] [--compare OLD_BIN] [--no-build] [--keep]
#   --runs N       timed runs per server and workload (default 3, after 1 warm-up)
#   --compare OLD_BIN  also serve TLS with OLD_BIN (say, the previous build) in
#                  every round and report new/old for every workload
#   --no-extents   also time `nbdcopy --no-extents` (all 4 GiB through TLS)
#   --no-build     use the existing target/release/nbdferry
#   --keep         keep the temp dir (image, certificates, logs)
#   NBDFERRY_BIN=path overrides the binary
# Needs: cargo, qemu-utils, nbdkit, libnbd-bin, python3, iproute2 (ss).
set -euo pipefail

# shellcheck source=proto-tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
NOEXT=0
bench_parse_args 34 --no-extents+NOEXT --compare=BIN_OLD -- "$@"
[ "$RUNS" -ge 1 ] 2>/dev/null || { echo "--runs needs a positive number" >&2; exit 2; }
bench_need_tools qemu-nbd qemu-img nbdkit nbdcopy python3 ss cmp
bench_build

bench_tmpdir WORK /tmp/nbdferry-bench-tls.XXXXXX
bench_make_image
PKI="$WORK/pki"
"$BIN" certs init "$PKI" >/dev/null

# start_ferry NAME ARGS... -> sets PORT and SERVER_PID
start_ferry() {
    local name="$1"
    shift
    bench_start_ferry "$name" "$WORK/$name.log" serve --read-only --listen 127.0.0.1:0 \
        --state-dir "$WORK/state-$name" "$@" "$IMG"
}

declare -A URI SPID
TLSQ="?tls-certificates=$PKI"

start_ferry ferry-tls --tls=require --tls-creds "$PKI"
URI[ferry-tls]="nbds://127.0.0.1:$PORT/$TLSQ"
SPID[ferry-tls]=$SERVER_PID

if [ -n "$BIN_OLD" ]; then
    BIN=$BIN_OLD start_ferry ferry-tls-old --tls=require --tls-creds "$PKI"
    URI[ferry-tls-old]="nbds://127.0.0.1:$PORT/$TLSQ"
    SPID[ferry-tls-old]=$SERVER_PID
fi

start_ferry ferry-plain
URI[ferry-plain]="nbd://127.0.0.1:$PORT/"
SPID[ferry-plain]=$SERVER_PID

bench_start_qemu "$WORK/qemu-nbd.log" -r \
    --object "tls-creds-x509,id=tls0,endpoint=server,dir=$PKI,verify-peer=on" --tls-creds tls0 \
    "$IMG"
SPID[qemu-tls]=$SERVER_PID
URI[qemu-tls]="nbds://127.0.0.1:$PORT/$TLSQ"

KPORT=$(free_port)
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$KPORT" \
    --tls=require --tls-certificates="$PKI" --tls-verify-peer \
    file file="$IMG" 2>"$WORK/nbdkit.log" &
PIDS+=("$!")
SPID[nbdkit-tls]=$!
wait_listen "$KPORT" "$!"
URI[nbdkit-tls]="nbds://127.0.0.1:$KPORT/$TLSQ"

KPORT=$(free_port)
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$KPORT" file file="$IMG" 2>"$WORK/nbdkit-plain.log" &
PIDS+=("$!")
SPID[nbdkit-plain]=$!
wait_listen "$KPORT" "$!"
URI[nbdkit-plain]="nbd://127.0.0.1:$KPORT/"

SERVERS=(ferry-tls qemu-tls nbdkit-tls ferry-plain nbdkit-plain)
REPORTED=("${SERVERS[@]}")
if [ -n "$BIN_OLD" ]; then SERVERS=(ferry-tls-old "${SERVERS[@]}"); fi

# Sanity: every server hands out the image, byte for byte (over TLS where
# it is a TLS server), before anything is timed.
for s in "${SERVERS[@]}"; do
    bench_check_served "${URI[$s]}" "$s" "$WORK/check.raw"
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

# qemu_opts SERVER -> qemu-img --image-opts for the server's URI
qemu_opts() {
    local u="${URI[$1]}" hp
    hp="${u#*://}"
    hp="${hp%%/*}"
    case "$u" in
        nbds:*) echo "driver=nbd,host=${hp%:*},port=${hp##*:},tls-creds=tls0" ;;
        *) echo "driver=nbd,host=${hp%:*},port=${hp##*:}" ;;
    esac
}

# run_once WORKLOAD SERVER -> prints elapsed seconds
run_once() {
    local w="$1" u="${URI[$2]}" t0 t1
    t0=$(now)
    case "$w" in
        copy-null) nbdcopy "$u" null: ;;
        copy-null-noext) nbdcopy --no-extents "$u" null: ;;
        copy-null-notrim)
            MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=1073741824 \
                MALLOC_TOP_PAD_=268435456 nbdcopy "$u" null:
            ;;
        qemu-convert)
            qemu-img convert -n \
                --object "tls-creds-x509,id=tls0,endpoint=client,dir=$PKI" \
                --image-opts "$(qemu_opts "$2")" \
                --target-image-opts "driver=null-co,size=$VSIZE"
            ;;
    esac
    t1=$(now)
    elapsed "$t0" "$t1"
}

WORKLOADS=(copy-null copy-null-notrim qemu-convert)
[ "$NOEXT" = 1 ] && WORKLOADS+=(copy-null-noext)

declare -A RESULT
for w in "${WORKLOADS[@]}"; do
    echo "== $w" >&2
    bench_time_servers "$w" 1 # order rotated each round
done

ARGS=("$VSIZE" "$DSIZE" "$RUNS")
for w in "${WORKLOADS[@]}"; do
    ARGS+=("$w")
    for s in "${REPORTED[@]}"; do ARGS+=("${RESULT[$w,$s]}" "${CPU[$w,$s]}"); done
done
ARGS+=(--)
for s in "${REPORTED[@]}"; do ARGS+=("$(hwm "${SPID[$s]}")"); done

python3 - "${ARGS[@]}" <<'EOF'
import sys
a = sys.argv[1:]
vsize, dsize, runs = int(a[0]), int(a[1]), int(a[2])
a = a[3:]
servers = ["ferry-tls", "qemu-tls", "nbdkit-tls", "ferry-plain", "nbdkit-plain"]
cmd = {"copy-null": "nbdcopy URI null:", "copy-null-noext": "nbdcopy --no-extents URI null:",
       "copy-null-notrim": "nbdcopy, glibc trim off", "qemu-convert": "qemu-img convert -> null-co"}
sep = a.index("--")
rows, rest = a[:sep], a[sep + 1:]
print(f"\nmedian of {runs} alternating runs; MB/s = {vsize / 2**30:.0f} GiB virtual size / time (MB = 10^6 B);\n"
      f"cpu = server CPU s per GiB of data read (utime + stime from /proc/PID/stat)")
print(f"{'workload':30} " + " ".join(f"{s:>18}" for s in servers))
ok = True
n = len(servers)
for i in range(0, len(rows), 2 * n + 1):
    w = rows[i]
    vals = list(map(float, rows[i + 1:i + 2 * n + 1]))
    t, c = dict(zip(servers, vals[0::2])), dict(zip(servers, vals[1::2]))
    gib = (vsize if w == "copy-null-noext" else dsize) / 2**30
    print(f"{cmd[w]:30} " + " ".join(f"{t[s]:7.3f}s {vsize / t[s] / 1e6:6.0f}MB/s" for s in servers))
    print(f"{'  server cpu s/GiB':30} " + " ".join(f"{c[s] / gib:18.2f}" for s in servers))
    f = t["ferry-tls"]
    vq, vk, vp = t["qemu-tls"] / f, t["nbdkit-tls"] / f, f / t["ferry-plain"]
    print(f"{'':30} ferry-tls vs qemu-tls {vq:.2f}x faster, vs nbdkit-tls {vk:.2f}x faster, "
          f"TLS/plain time {vp:.2f}x (nbdkit's own {t['nbdkit-tls'] / t['nbdkit-plain']:.2f}x)")
    if w == "copy-null":
        ok = vk >= 1.1 and vq > 1 and c["ferry-tls"] < min(c["qemu-tls"], c["nbdkit-tls"])
print(f"{'peak RSS (VmHWM)':30} " + " ".join(f"{x:>18}" for x in rest))
print("goal (copy-null): >= 1.1x nbdkit-tls, faster than qemu-tls, server cpu per GiB below both: "
      + ("MET" if ok else "NOT MET"))
EOF

if [ -n "$BIN_OLD" ]; then
    rows=()
    for w in "${WORKLOADS[@]}"; do
        rows+=("$w (TLS)|s|${SAMPLES[$w,ferry-tls-old]}|${SAMPLES[$w,ferry-tls]}")
    done
    bench_compare_table "${rows[@]}"
    for w in "${WORKLOADS[@]}"; do
        echo "server cpu s per run, $w: old ${CPU[$w,ferry-tls-old]}, new ${CPU[$w,ferry-tls]}"
    done
fi
