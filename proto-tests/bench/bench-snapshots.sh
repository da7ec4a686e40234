#!/usr/bin/env bash
# Snapshot/checkpoint overhead benchmark: the live export of one nbdferry
# (release build) serving a 1 GiB fully allocated image, measured with fio's
# nbd engine under four states of the disk:
#   none    no checkpoint, no snapshot (the untracked baseline)
#   cp1     one checkpoint (dirty tracking)
#   snap1   one snapshot (copy-on-write of first overwrites)
#   snap4   four snapshots (a preserved block is shared by all four)
# Before every run the checkpoints/snapshots are deleted and created again,
# so every write-block is a *first* write for tracking / copy-on-write:
# the worst case, not the steady state.
#
# Workloads (fio, one connection):
#   seqwrite  1 MiB sequential writes over the whole disk, QD16   -> MB/s
#   randwrite 4 KiB random writes, QD32, RUNTIME seconds          -> IOPS
#   seqread   1 MiB sequential reads of the whole disk, QD16      -> MB/s
#
# Goals: cp1 >= 0.95x none (writes); reads with snapshots >= 0.95x none;
# snap1 first-overwrite writes >= 0.5x none. Reported twice: medians, and
# the best run of each state (this VM's page-cache speed flips between
# about 1.5 and 4 GB/s from run to run, and noise only ever slows a run).
#
# Also measured, as the ceiling for snap1's seqwrite: what this disk makes
# durable per second (fio, 16 writers of 1 MiB O_DIRECT writes, each
# followed by fdatasync, into a fresh file in the work directory). A first
# overwrite must make the old block durable before the new one may reach
# the disk, so snap1 cannot beat it, while "none" only fills the page cache.
#
# With --xfs-reflink (root) the image lives on a loop-mounted XFS with
# reflinks (an 8 GiB sparse file in the work directory), so snapshots are
# reflink clones: the goals are then snap1 >= 0.8x none for seqwrite and
# >= 0.9x for randwrite, and the time `snapshot create` takes on a 4 GiB
# fully allocated image is reported too (median of --runs x 5 creates,
# each followed by a delete; the CLI's round trip included).
#
# Usage: proto-tests/bench/bench-snapshots.sh [--runs N] [--fio-runtime S] [--compare OLD_BIN] [--xfs-reflink] [--no-build] [--keep]
#   --compare OLD_BIN  also run OLD_BIN (say, the previous release) on the
#                      same image, right before or after $BIN in every
#                      measurement (the order alternates), and report
#                      new/old for every figure
#   NBDFERRY_BIN=path overrides the binary.
# Needs: cargo, fio (nbd engine), python3.
set -euo pipefail

# shellcheck source=proto-tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
FIO_RUNTIME=10
XFS=0
bench_parse_args 42 --fio-runtime=FIO_RUNTIME --compare=BIN_OLD --xfs-reflink+XFS -- "$@"
bench_need_tools fio python3
if [ "$XFS" = 1 ]; then bench_need_tools mkfs.xfs losetup; fi
bench_build

bench_tmpdir WORK /tmp/nbdferry-snapbench.XXXXXX

# Where the images (and so reflink clones) live.
IMGDIR="$WORK"
if [ "$XFS" = 1 ]; then
    bench_mount_xfs IMGDIR "$WORK" $((8 * 1024 * 1024 * 1024))
fi
IMG="$IMGDIR/disk.raw"
SIZE=$((1024 * 1024 * 1024))
# make_image PATH: 1 GiB of data written in 1 MiB writes, synced and then
# dropped from the page cache. Every image is made the same way and starts
# uncached: how a file was written decides the size of its page-cache
# folios (a `cp` copy gets 64 KiB ones, 1 MiB writes 1 MiB ones), and 4 KiB
# random writes into large folios cost ext4 about twice as much, which
# once showed up here as a false old/new ratio.
make_image() { # PATH [SIZE]
    echo "creating a ${2:-$SIZE}-byte allocated image $1" >&2
    python3 - "$1" "${2:-$SIZE}" <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
block = os.urandom(1 << 20)
with open(path, "wb") as f:
    for _ in range(size >> 20):
        f.write(block)
    f.flush()
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
EOF
}
make_image "$IMG"

# The binaries (BINS): ferry is $BIN, ferry-old the --compare one. They
# take turns on the same image, one server at a time, each started afresh
# (empty state directory) for every measurement: both see the same file,
# the same page-cache folios and the same disk layout.
BINS=(ferry)
declare -A EXE=([ferry]="$BIN") STATE=([ferry]="$WORK/state")
if [ -n "$BIN_OLD" ]; then
    BINS=(ferry-old ferry)
    EXE[ferry-old]=$BIN_OLD
    STATE[ferry-old]="$WORK/state-old"
fi
URI=""
# serve BIN-KEY: a fresh server of the image, with an empty state.
# (Clones a reflink snapshot left beside the image have no state left to
# name them: the server removes them when it starts.)
serve() { # BIN-KEY [IMAGE]
    rm -rf "${STATE[$1]}"
    BIN=${EXE[$1]} bench_start_ferry "nbdferry${1#ferry}" "$WORK/server${1#ferry}.log" \
        serve --listen 127.0.0.1:0 --name disk --state-dir "${STATE[$1]}" "${2:-$IMG}"
    URI="nbd://127.0.0.1:$PORT/disk"
}

ctl() { # BIN-KEY ARGS...
    local b="$1"
    shift
    "${EXE[$b]}" "$@" --admin "${STATE[$b]}/admin.sock" >/dev/null
}

# check_backend BIN-KEY: the snapshots are what this run measures.
check_backend() {
    local want=preserved-blocks got
    if [ "$XFS" = 1 ]; then want=reflink; fi
    got=$("${EXE[$1]}" snapshot list disk --admin "${STATE[$1]}/admin.sock" |
        python3 -c 'import json, sys; print(json.load(sys.stdin).get("backend", "preserved-blocks"))')
    if [ "$got" != "$want" ]; then
        echo "snapshots of $1 use $got, not $want" >&2
        exit 1
    fi
}

# set_state BIN-KEY STATE: create STATE's checkpoints or snapshots.
set_state() {
    local b="$1" n
    case "$2" in
        none) ;;
        cp1) ctl "$b" checkpoint create disk c1 ;;
        snap1)
            ctl "$b" snapshot create disk sa
            check_backend "$b"
            ;;
        snap4) for n in a b c d; do ctl "$b" snapshot create disk "s$n"; done ;;
    esac
    # Start every measurement with clean page cache: no run pays for the
    # writeback of the one before it.
    sync
}

# fio_run BIN-KEY WORKLOAD OUT.json
fio_run() {
    local args=(--name=b --ioengine=nbd --uri="$URI" --output-format=json --output="$3")
    case "$2" in
        seqwrite) args+=(--rw=write --bs=1m --iodepth=16 --size=1g) ;;
        randwrite) args+=(--rw=randwrite --bs=4k --iodepth=32 --runtime="$FIO_RUNTIME" --time_based) ;;
        seqread) args+=(--rw=read --bs=1m --iodepth=16 --size=1g) ;;
    esac
    fio "${args[@]}" >/dev/null
}

metric() { # WORKLOAD OUT.json
    python3 - "$1" "$2" <<'EOF'
import json, sys
w, path = sys.argv[1], sys.argv[2]
j = json.load(open(path))["jobs"][0]
if w == "randwrite":
    print(j["write"]["iops"])
elif w == "seqwrite":
    print(j["write"]["bw_bytes"] / 1e6)
else:
    print(j["read"]["bw_bytes"] / 1e6)
EOF
}

STATES=(none cp1 snap1 snap4)
WORKLOADS=(seqwrite randwrite seqread)
declare -A VALUES STORE_KB
serve ferry # page cache warm for every run alike
fio_run ferry seqread "$WORK/warmup.json"
bench_stop "$SERVER_PID"
for r in $(seq "$RUNS"); do
    for w in "${WORKLOADS[@]}"; do
        # Alternate the states inside one run, starting at a different one
        # each run, so drift and ordering hit them alike; and so the
        # binaries, which one goes first flipping from state to state.
        for k in "${!STATES[@]}"; do
            s=${STATES[$(((k + r - 1) % ${#STATES[@]}))]}
            for j in "${!BINS[@]}"; do
                b=${BINS[$(((j + k + r) % ${#BINS[@]}))]}
                serve "$b"
                set_state "$b" "$s"
                out="$WORK/$w-$s-$r${b#ferry}.json"
                fio_run "$b" "$w" "$out"
                bench_stop "$SERVER_PID"
                v=$(metric "$w" "$out")
                echo "run $r $w $s${b#ferry}: $v" >&2
                VALUES[$b,$w,$s]="${VALUES[$b,$w,$s]:-} $v"
            done
        done
    done
done
for b in "${BINS[@]}"; do
    STORE_KB[$b]=$(du -k "${STATE[$b]}/disks/disk/cow.store" 2>/dev/null | cut -f1 || echo 0)
done

ceiling() {
    rm -f "$IMGDIR/ceiling.raw"
    fio --name=ceiling --filename="$IMGDIR/ceiling.raw" --rw=write --bs=1m --direct=1 \
        --ioengine=psync --fdatasync=1 --numjobs=16 --size=64m --offset_increment=64m \
        --group_reporting --output-format=json --output="$WORK/ceiling.json" >/dev/null
    rm -f "$IMGDIR/ceiling.raw"
    metric seqwrite "$WORK/ceiling.json"
}
CEILS=""
for r in $(seq "$RUNS"); do CEILS="$CEILS $(ceiling)"; done

# Reflink snapshots: what `snapshot create` costs on a 4 GiB image (the
# clone's metadata grows with the image's extents, not its bytes).
CREATE_MS=""
if [ "$XFS" = 1 ]; then
    rm -f "$IMG"
    BIG="$IMGDIR/big.raw"
    make_image "$BIG" $((4 * 1024 * 1024 * 1024))
    for b in "${BINS[@]}"; do
        serve "$b" "$BIG"
        for r in $(seq $((RUNS * 5))); do
            t0=$(now)
            ctl "$b" snapshot create disk "c$r"
            t1=$(now)
            check_backend "$b"
            ctl "$b" snapshot delete disk "c$r"
            ms=$(python3 -c "print(f'{($t1 - $t0) * 1000:.1f}')")
            echo "snapshot create on 4 GiB ($b): $ms ms" >&2
            CREATE_MS="$CREATE_MS $b:$ms"
        done
        bench_stop "$SERVER_PID"
    done
fi

# Every run's figure goes to the report, which gives medians and the best
# run of each (interference on a shared VM only ever slows a run down).
# report BIN-KEY
report() {
    local args=("$RUNS" "$FIO_RUNTIME" "${STORE_KB[$1]}" "$XFS" "ceiling:${CEILS# }") w s c creates=""
    for c in $CREATE_MS; do
        if [ "${c%%:*}" = "$1" ]; then creates="$creates ${c#*:}"; fi
    done
    if [ -n "$creates" ]; then args+=("create:${creates# }"); fi
    for w in "${WORKLOADS[@]}"; do
        for s in "${STATES[@]}"; do args+=("$w,$s:${VALUES[$1,$w,$s]# }"); done
    done
    python3 - "${args[@]}" <<'EOF'
import statistics, sys
a = sys.argv[1:]
runs, rt, store_kb, xfs = a[0], a[1], a[2], a[3] == "1"
vals = {}
for arg in a[4:]:
    key, xs = arg.split(":")
    vals[key] = [float(x) for x in xs.split()]
states = ["none", "cp1", "snap1", "snap4"]
# Reflink snapshots leave the first overwrite to the file system.
seq_goal, rand_goal = (0.8, 0.9) if xfs else (0.5, 0.5)
rows = [("seqwrite", "seqwrite 1M QD16 (MB/s)", 0.95, seq_goal),
        ("randwrite", f"randwrite 4k QD32 {rt}s (IOPS)", 0.95, rand_goal),
        ("seqread", "seqread 1M QD16 (MB/s)", 0.95, 0.95)]
if xfs:
    print("image on a loop-mounted XFS with reflinks: snapshots are reflink clones")
ok = lambda r, g: "ok" if r >= g else "MISS"
for label, stat in (("median", statistics.median), ("best", max)):
    print(f"\n{label} of {runs} runs; state recreated before every run (first writes only)")
    print(f"{'workload':30} {'none':>10} {'cp1':>10} {'snap1':>10} {'snap4':>10}   ratios cp1/snap1/snap4 (goal cp1, snap)")
    for w, name, gc, gs in rows:
        n, c, s1, s4 = (stat(vals[f"{w},{s}"]) for s in states)
        print(f"{name:30} {n:10.0f} {c:10.0f} {s1:10.0f} {s4:10.0f}   "
              f"{c/n:.2f} {ok(c/n, gc)} / {s1/n:.2f} {ok(s1/n, gs)} / {s4/n:.2f} {ok(s4/n, gs)}  (>= {gc}, >= {gs})")
    ceiling, none, snap1 = (stat(vals[k]) for k in ("ceiling", "seqwrite,none", "seqwrite,snap1"))
    print(f"disk ceiling, durable 1M writes x16 (fio direct+fdatasync): {ceiling:.0f} MB/s = "
          f"{ceiling / none:.2f}x none; snap1 seqwrite reaches {snap1 / ceiling:.2f}x of it")
print(f"preserved-block store after the last run: {int(store_kb)//1024} MiB")
if "create" in vals:
    c = vals["create"]
    print(f"snapshot create on a 4 GiB allocated image: median {statistics.median(c):.1f} ms, "
          f"max {max(c):.1f} ms ({len(c)} creates, CLI round trip included)")
EOF
}

if [ -z "$BIN_OLD" ]; then
    report ferry
else
    echo -e "\n== old: $BIN_OLD"
    report ferry-old
    echo -e "\n== new: $BIN"
    report ferry
    rows=()
    for w in "${WORKLOADS[@]}"; do
        unit=MB/s
        if [ "$w" = randwrite ]; then unit=IOPS; fi
        for s in "${STATES[@]}"; do
            rows+=("$w $s|$unit|${VALUES[ferry-old,$w,$s]# }|${VALUES[ferry,$w,$s]# }")
        done
    done
    bench_compare_table "${rows[@]}"
fi
