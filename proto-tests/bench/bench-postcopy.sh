#!/usr/bin/env bash
# Post-copy benchmark: a destination that serves a disk at once while it
# arrives from its source (`nbdferry serve --source URI`), against
# `nbdferry copy` of the same disk and against the two peers that can do
# the same: nbdkit's cow filter with cow-on-read over its nbd plugin, and
# qemu-storage-daemon with a qcow2 overlay whose backing file is the NBD
# source, under a copy-on-read filter, plus a block-stream job. Same
# source, same workloads; tools alternated, the first one rotated per round.
#
# Image: 1 GiB raw, half allocated (mk-image.py --size-mib 1024 --runs 512:
# 512 runs of 1 MiB random data). Source: `nbdferry serve --read-only` of
# it, 127.0.0.1 TCP, one for the whole benchmark, shared by every tool.
# Every destination is fresh per run (file, state dir, overlay), in a temp
# dir on /tmp, or under --dest-dir (/dev/shm: tmpfs, where fsync is free,
# to tell the cost of durability from the rest).
#
# Cases:
#   hyd      the whole disk arrives.
#            nbdferry: `serve --source SRC dst.raw`, spawn -> the daemon's
#              own "completed_at" stamp (seen by `hydrate status --watch`);
#            copy: `nbdferry copy SRC copy.raw`, and with --flush (the pass
#              makes every block durable, plain copy does not);
#            nbdkit: has no background pass, so the time of `nbdcopy URI
#              null:` through the cow-on-read filter (the reads fill its
#              overlay);
#            qemu: block-stream start -> BLOCK_JOB_COMPLETED (qemu's stamp);
#            ceiling (not on tmpfs or with --shape): fio writes the
#              source's amount of data to the destination's file system,
#              direct, 16 x 1 MiB in flight, then fsync: what that storage
#              takes durably bounds any hydration, which makes every block
#              durable.
#            The CPU time of nbdferry's destination (the daemon, spawn to
#            stop) and of the copy process is shown too, and copy's time
#            over hydration's per round (each round's pair runs back to
#            back, so the machine's drift weighs less than between medians).
#            Every run is verified: nbdferry's and copy's file with cmp
#            against the image (after the daemon stopped); qemu's overlay
#            alone (backing=null) converted to raw; nbdkit's export (its
#            overlay is an unlinked temp file) copied out with nbdcopy. A
#            mismatch is printed loudly; the script exits 1 at the end.
#   first    QD1 random 4 KiB reads, each in a distinct 64 KiB block of data
#            (none in the first 4 MiB), so each is its block's first read:
#            fresh destinations whose background pass is held (nbdferry
#            --rate 1: the holes up to the first data, one 1 MiB fetch of
#            it, then nothing; those reads are compared, not excluded; qemu: no
#            stream job; nbdkit has none), against the plain source export
#            (one round trip), and against the floor of any design that
#            serves from a second server: nbdkit's nbd plugin alone, a
#            pass-through proxy (two round trips, nothing stored). Same
#            offsets for every tool of a round. Every read is compared
#            with the image.
#   present  nbdferry only: the last 128 MiB pre-read (so present), then QD1
#            4 KiB reads and fio randread 4k QD32 inside it while the
#            background pass runs at --hyd-rate, against the plain export.
#            The pass must still be running at the end (checked, shown).
#            Also with the pass held (--rate 1): the copy-on-read layer's
#            own cost, without the pass competing for the 2 cores; and a
#            plain writable export (`serve --state-dir` of a copy of the
#            image, no --source): the same disk stack, no copy-on-read.
#            Each also gives the serving process's CPU time per fio read.
# Every run starts after a `sync`, so that no run pays for the previous
# one's writeback.
# Goals: copy / hydration time >= 1.0; first-read latency <= 2x plain;
# present reads >= 0.9x plain; over a shaped link, hydration moves the
# source's data at >= 90% of the link's rate.
#
# Two hosts (--shape RATE, root only): the source runs in one network
# namespace (10.203.0.1), the script and every destination in a second
# one, joined by a veth pair shaped with `tc tbf` at RATE (a tc rate:
# 1gbit, 200mbit) both ways; the namespaces go at exit. Default case then:
# hyd, and its table gives each tool's share of the link's rate (the
# packets' headers take ~4% of it at the veth's 1500-byte MTU).
#
# Usage: proto-tests/bench/bench-postcopy.sh [--runs N] [--reads N]
#        [--hyd-rate BYTES/s] [--fio-runtime S] [--dest-dir DIR] [--cases LIST]
#        [--shape RATE] [--no-build] [--keep]
#   --runs N          timed rounds (default 3), after one untimed warm-up round
#   --reads N         timed reads per run of "first" and "present" (default 1000)
#   --hyd-rate R      nbdferry --rate during "present" (default 24M: the
#                     pass paces the source's data, not its holes, so the
#                     512 MiB of data take ~21 s)
#   --fio-runtime S   seconds of fio per "present" run (default 5)
#   --dest-dir DIR    where destinations live (default: the temp dir on /tmp)
#   --cases LIST      which cases to run (default "hyd first present")
#   --no-build        use the existing target/release/nbdferry
#   --keep            keep the temp dir (image, logs, results.jsonl)
#   NBDFERRY_BIN=path overrides the binary.
# Needs: cargo, nbdkit (cow filter, nbd plugin), qemu-storage-daemon,
# qemu-img, nbdcopy, fio, python3, /usr/bin/python3 with libnbd's module
# (python3-libnbd), iproute2 (ss; ip and tc for --shape).
set -euo pipefail

# shellcheck source=proto-tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
NREADS=1000
HRATE=24M
FIO_RUNTIME=5
DEST_DIR=""
CASES=""
SHAPE=""
SRC_NS=""
ARGS=("$@")
bench_parse_args 81 --reads=NREADS --hyd-rate=HRATE --fio-runtime=FIO_RUNTIME \
    --dest-dir=DEST_DIR --cases=CASES --shape=SHAPE --src-ns=SRC_NS -- "$@"
if [ -z "$CASES" ]; then
    CASES="hyd first present"
    if [ -n "$SHAPE" ]; then CASES=hyd; fi
fi
for c in $CASES; do
    case "$c" in
        hyd | first | present) ;;
        *) echo "unknown case: $c (want hyd, first, present)" >&2; exit 2 ;;
    esac
done
bench_need_tools nbdkit qemu-storage-daemon qemu-img nbdcopy fio python3 /usr/bin/python3 ss cmp
/usr/bin/python3 -c 'import nbd' || { echo "/usr/bin/python3 has no nbd module" >&2; exit 1; }
nbdkit -U - --filter=cow null 1M cow-on-read=true --run true ||
    { echo "nbdkit's cow filter does not take cow-on-read=true" >&2; exit 1; }
if [ -n "$SHAPE" ] && [ -z "$SRC_NS" ]; then
    bench_two_hosts nfpostcopy "$SHAPE"
    bench_build
    echo "two hosts: $NS_A (source, 10.203.0.1) and $NS_B (destinations), veth shaped to $SHAPE" >&2
    ip netns exec "$NS_B" "$0" "${ARGS[@]}" --no-build --cases "$CASES" --src-ns "$NS_A"
    exit $?
fi
bench_build

DRIVE=(/usr/bin/python3 "$HERE/postcopy-drive.py")
bench_tmpdir WORK /tmp/nbdferry-postcopybench.XXXXXX
DW=$WORK
if [ -n "$DEST_DIR" ]; then bench_tmpdir DW "$DEST_DIR/nbdferry-postcopybench-dst.XXXXXX"; fi
IMG="$WORK/src.raw"
python3 "$HERE/mk-image.py" "$IMG" --size-mib 1024 --runs 512 >&2
PLAIN_RW="$DW/plain-rw.raw"
cp --sparse=always "$IMG" "$PLAIN_RW"
VSIZE=$(stat -c %s "$IMG")
DATA_BYTES=$((512 << 20)) # mk-image.py's 512 runs of 1 MiB
# Where syncs cost something, what the destination's storage can take
# durably bounds any hydration: measured in the same run (not on tmpfs,
# and not behind a shaped link, which is the bound there).
CEILING=ceiling
if [ "$(stat -f -c %T "$DW")" = tmpfs ] || [ -n "$SHAPE" ]; then CEILING=""; fi
REG_LEN=$((128 << 20))
REG_OFF=$((VSIZE - REG_LEN))
cat "$IMG" >/dev/null # the source serves from the page cache
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "machine: $(nproc) cpus, load $LOAD0 at start" >&2
T_BEGIN=$(date +%s)

SRC_ADDR=127.0.0.1
if [ -n "$SRC_NS" ]; then
    SRC_ADDR=10.203.0.1
    BENCH_EXEC=(ip netns exec "$SRC_NS")
fi
bench_start_ferry source "$WORK/source.log" serve --read-only --listen "$SRC_ADDR:0" \
    --name disk --state-dir "$WORK/src-state" "$IMG"
BENCH_EXEC=()
SRC_URI="nbd://$SRC_ADDR:$PORT/disk"
SRC_PID=$SERVER_PID

# emit KEY=JSON... @FILE...: one record into $RESULTS (values that are
# not JSON are taken as strings; @FILE merges a JSON object).
emit() {
    python3 - "$@" >>"$RESULTS" <<'EOF'
import json, sys
rec = {}
for a in sys.argv[1:]:
    if a.startswith("@"):
        rec.update(json.load(open(a[1:])))
        continue
    k, v = a.split("=", 1)
    try:
        rec[k] = json.loads(v)
    except ValueError:
        rec[k] = v
print(json.dumps(rec))
EOF
    echo "   $(tail -n1 "$RESULTS")" >&2
}

MISMATCH=0
# verify FILE WHAT: FILE must equal the image, or the run is marked bad.
verify() {
    if cmp -s "$1" "$IMG"; then
        echo true
    else
        echo "!!!!!!!! MISMATCH: $2: the hydrated disk differs from the source image !!!!!!!!" >&2
        cmp "$1" "$IMG" 2>&1 | head -n1 >&2 || true
        echo false
    fi
}

# start_ferry TAG [RATE]: a fresh post-copy destination. Sets DST_PID,
# DST_URI, ADMIN, DST.
start_ferry() {
    local args=(serve --listen 127.0.0.1:0 --name disk --state-dir "$DW/dst-state"
        --source "$SRC_URI")
    DST="$DW/dst.raw"
    rm -rf "$DST" "$DW/dst-state"
    if [ -n "${2:-}" ]; then args+=(--rate "$2"); fi
    bench_start_ferry destination "$WORK/dst-$1.log" "${args[@]}" "$DST"
    DST_PID=$SERVER_PID
    DST_URI="nbd://127.0.0.1:$PORT/disk"
    ADMIN="$DW/dst-state/admin.sock"
}

# start_plain_rw TAG: a plain writable export of a copy of the image, with
# a disk state like the destination's but no source. Sets DST_PID, DST_URI.
start_plain_rw() {
    rm -rf "$DW/rw-state"
    bench_start_ferry plain-rw "$WORK/rw-$1.log" serve --listen 127.0.0.1:0 --name disk \
        --state-dir "$DW/rw-state" "$PLAIN_RW"
    DST_PID=$SERVER_PID
    DST_URI="nbd://127.0.0.1:$PORT/disk"
}

# start_nbdkit [proxy]: nbdkit's cow filter with cow-on-read over its nbd
# plugin, its overlay (a temp file) in $DW; with "proxy", the nbd plugin
# alone (no filter, nothing stored). Sets NK_PID, NK_URI.
start_nbdkit() {
    local filter=(--filter=cow)
    local args=(cow-on-read=true)
    if [ "${1:-}" = proxy ]; then filter=(); args=(); fi
    PORT=$(free_port)
    TMPDIR="$DW" nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$PORT" \
        "${filter[@]}" nbd uri="$SRC_URI" "${args[@]}" 2>>"$WORK/nbdkit.log" &
    NK_PID=$!
    PIDS+=("$NK_PID")
    wait_listen "$PORT" "$NK_PID"
    NK_URI="nbd://127.0.0.1:$PORT/"
}

# start_qsd: a fresh qcow2 overlay backed by the source, opened under a
# copy-on-read filter and exported over NBD. Sets QSD_PID, QSD_URI, OV, QMP.
start_qsd() {
    OV="$DW/overlay.qcow2"
    QMP="$WORK/qmp.sock"
    rm -f "$OV" "$QMP"
    qemu-img create -q -f qcow2 -b "$SRC_URI" -F raw "$OV"
    PORT=$(free_port)
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f0,filename=$OV" \
        --blockdev driver=qcow2,node-name=ov,file=f0 \
        --blockdev driver=copy-on-read,node-name=cor,file=ov \
        --chardev "socket,path=$QMP,server=on,wait=off,id=c0" --monitor chardev=c0 \
        --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$PORT" \
        --export type=nbd,id=e0,node-name=cor,name=disk \
        2>>"$WORK/qsd.log" &
    QSD_PID=$!
    PIDS+=("$QSD_PID")
    wait_listen "$PORT" "$QSD_PID"
    for _ in $(seq 100); do [ -S "$QMP" ] && break; sleep 0.05; done
    QSD_URI="nbd://127.0.0.1:$PORT/disk"
}

# children_cpu BEFORE AFTER: the CPU seconds of the children this shell
# waited for between two saves of `times` (their second line: children's
# user and system time, as 0m1.234s).
children_cpu() {
    cat "$1" "$2" | awk 'NR % 2 == 0 {
        for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); c[NR] += t[1] * 60 + t[2] } }
        END { printf "%.3f\n", c[4] - c[2] }'
}

# hyd_run TOOL REP: the whole disk arrives at TOOL's destination, timed
# and verified.
hyd_run() {
    local tool="$1" rep="$2" t0 t1 ok out="$WORK/out.json" chk="$DW/check.raw"
    sync
    case "$tool" in
        nbdferry)
            t0=$(now)
            start_ferry "hyd-$rep"
            # The daemon stamps the pass's end itself ("completed_at"), so
            # a watcher that looks once a second times it exactly, and
            # takes next to no CPU from the pass (a Python poller's
            # start-up took some).
            timeout 600 "$BIN" hydrate status disk --watch --json --admin "$ADMIN" | tail -n1 >"$out"
            local cpu
            cpu=$(awk -v t="$(cpu_ticks "$DST_PID")" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
            bench_stop "$DST_PID"
            ok=$(verify "$DST" "hyd nbdferry run $rep")
            emit case=hyd tool=nbdferry rep="$rep" t0="$t0" cpu="$cpu" ok="$ok" @"$out"
            rm -f "$DST"
            ;;
        copy | copy-flush)
            local flush=()
            if [ "$tool" = copy-flush ]; then flush=(--flush); fi
            rm -f "$chk"
            # `times` in this shell (not in a subshell, whose children
            # are its own) brackets the CPU of copy alone.
            times >"$WORK/cpu0"
            t0=$(now)
            "$BIN" copy "${flush[@]}" --progress=none "$SRC_URI" "$chk"
            t1=$(now)
            times >"$WORK/cpu1"
            ok=$(verify "$chk" "hyd $tool run $rep")
            emit case=hyd tool="$tool" rep="$rep" secs="$(elapsed "$t0" "$t1")" \
                cpu="$(children_cpu "$WORK/cpu0" "$WORK/cpu1")" ok="$ok"
            ;;
        ceiling)
            # The destination's file system: the source's data written
            # durably by fio alone (direct, 16 x 1 MiB in flight, no
            # network), fio's own runtime.
            rm -f "$chk"
            fio --name=ceiling --filename="$chk" --rw=write --bs=1M --direct=1 --iodepth=16 \
                --ioengine=libaio --size="$DATA_BYTES" --fallocate=none --end_fsync=1 \
                --output-format=json >"$out"
            local secs
            secs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["job_runtime"] / 1000)' "$out")
            emit case=hyd tool=ceiling rep="$rep" secs="$secs"
            rm -f "$chk"
            return # nothing to verify
            ;;
        nbdkit)
            start_nbdkit
            t0=$(now)
            nbdcopy "$NK_URI" null:
            t1=$(now)
            rm -f "$chk"
            nbdcopy "$NK_URI" "$chk"
            bench_stop "$NK_PID"
            ok=$(verify "$chk" "hyd nbdkit run $rep")
            emit case=hyd tool=nbdkit rep="$rep" secs="$(elapsed "$t0" "$t1")" ok="$ok"
            ;;
        qemu)
            start_qsd
            "${DRIVE[@]}" qemu-stream --qmp "$QMP" >"$out"
            bench_stop "$QSD_PID"
            rm -f "$chk"
            qemu-img convert -f qcow2 -O raw \
                "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$OV\"},\"backing\":null}" \
                "$chk"
            ok=$(verify "$chk" "hyd qemu run $rep")
            local backing
            backing=$(qemu-img info --output=json "$OV" |
                python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin).get("backing-filename")))')
            emit case=hyd tool=qemu rep="$rep" ok="$ok" backing_left="$backing" @"$out"
            rm -f "$OV"
            ;;
    esac
    rm -f "$chk"
    if [ "$ok" != true ]; then MISMATCH=1; fi
}

# first_run TOOL REP SEED: QD1 first reads of absent blocks.
first_run() {
    local tool="$1" rep="$2" seed="$3" out="$WORK/out.json" st="$WORK/st.json" t0 t1
    local reads=(reads --image "$IMG" --n "$NREADS" --seed "$seed")
    sync
    case "$tool" in
        plain)
            "${DRIVE[@]}" "${reads[@]}" "$SRC_URI" >"$out"
            emit case=first tool=plain rep="$rep" @"$out"
            ;;
        nbdferry)
            start_ferry "first-$rep" 1
            "${DRIVE[@]}" "${reads[@]}" "$DST_URI" >"$out"
            "${DRIVE[@]}" ferry-status --admin "$ADMIN" >"$st"
            t0=$(now)
            bench_stop "$DST_PID"
            t1=$(now)
            emit case=first tool=nbdferry rep="$rep" stop_s="$(elapsed "$t0" "$t1")" \
                status="$(cat "$st")" @"$out"
            ;;
        nbdkit)
            start_nbdkit
            "${DRIVE[@]}" "${reads[@]}" "$NK_URI" >"$out"
            bench_stop "$NK_PID"
            emit case=first tool=nbdkit rep="$rep" @"$out"
            ;;
        proxy)
            start_nbdkit proxy
            "${DRIVE[@]}" "${reads[@]}" "$NK_URI" >"$out"
            bench_stop "$NK_PID"
            emit case=first tool=proxy rep="$rep" @"$out"
            ;;
        qemu)
            start_qsd
            "${DRIVE[@]}" "${reads[@]}" "$QSD_URI" >"$out"
            bench_stop "$QSD_PID"
            emit case=first tool=qemu rep="$rep" @"$out"
            ;;
    esac
    if grep -q '"bad": [1-9]' "$out"; then
        echo "!!!!!!!! MISMATCH: first $tool run $rep: reads differ from the image !!!!!!!!" >&2
        MISMATCH=1
    fi
}

# fio_iops URI PID: fio randread 4k QD32 inside the region: its IOPS, and
# the CPU time the server PID spent meanwhile per read, in us.
fio_iops() {
    local f="$WORK/fio.json" c0 c1
    c0=$(cpu_ticks "$2")
    fio --name=present --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 \
        --offset="$REG_OFF" --size="$REG_LEN" --runtime="$FIO_RUNTIME" --time_based \
        --output-format=json --output="$f" >/dev/null
    c1=$(cpu_ticks "$2")
    python3 - "$f" "$c0" "$c1" "$CLK_TCK" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
c0, c1, tck = map(int, sys.argv[2:])
print(r["iops"], (c1 - c0) * 1e6 / tck / max(r["total_ios"], 1))
EOF
}

# present_run TOOL REP SEED: reads of present blocks (nbdferry: while the
# background pass runs; nbdferry-held: with the pass held).
present_run() {
    local tool="$1" rep="$2" seed="$3" out="$WORK/out.json" s1 s2 line iops cpu uri=$SRC_URI pid=$SRC_PID
    local reads=(reads --image "$IMG" --n "$NREADS" --seed "$seed" --region "$REG_OFF" "$REG_LEN" --prefetch)
    sync
    case "$tool" in
        nbdferry) start_ferry "present-$rep" "$HRATE" ;;
        nbdferry-held) start_ferry "held-$rep" 1 ;;
        plain-rw) start_plain_rw "$rep" ;;
    esac
    if [ "$tool" != plain ]; then uri=$DST_URI pid=$DST_PID; fi
    "${DRIVE[@]}" "${reads[@]}" "$uri" >"$out"
    case "$tool" in nbdferry*) s1=$("${DRIVE[@]}" ferry-status --admin "$ADMIN") ;; esac
    line=$(fio_iops "$uri" "$pid") # not inside `read`: a failure stops the script
    read -r iops cpu <<<"$line"
    case "$tool" in
        nbdferry*)
            s2=$("${DRIVE[@]}" ferry-status --admin "$ADMIN")
            bench_stop "$DST_PID"
            emit case=present tool="$tool" rep="$rep" iops="$iops" cpu_us="$cpu" before="$s1" after="$s2" @"$out"
            ;;
        plain-rw)
            bench_stop "$DST_PID"
            emit case=present tool="$tool" rep="$rep" iops="$iops" cpu_us="$cpu" @"$out"
            ;;
        *) emit case=present tool=plain rep="$rep" iops="$iops" cpu_us="$cpu" @"$out" ;;
    esac
    if grep -q '"bad": [1-9]' "$out"; then
        echo "!!!!!!!! MISMATCH: present $tool run $rep: reads differ from the image !!!!!!!!" >&2
        MISMATCH=1
    fi
}

# rotated R TOOLS...: TOOLS, starting at the (R mod n)-th.
rotated() {
    local r="$1" i
    shift
    for i in $(seq 0 $(($# - 1))); do
        local k=$(((i + r) % $# + 1))
        echo "${!k}"
    done
}

for r in $(seq 0 "$RUNS"); do
    if [ "$r" = 0 ]; then echo "== warm-up round (not counted)" >&2; else echo "== round $r" >&2; fi
    if [[ " $CASES " == *" hyd "* ]]; then
        for t in $(rotated "$r" nbdferry copy copy-flush nbdkit qemu $CEILING); do hyd_run "$t" "$r"; done
    fi
    if [[ " $CASES " == *" first "* ]]; then
        for t in $(rotated "$r" plain nbdferry nbdkit qemu proxy); do first_run "$t" "$r" $((100 + r)); done
    fi
    if [[ " $CASES " == *" present "* ]]; then
        for t in $(rotated "$r" plain nbdferry nbdferry-held plain-rw); do
            present_run "$t" "$r" $((200 + r))
        done
    fi
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench time $(($(date +%s) - T_BEGIN)) s; load $LOAD0 at start, $LOAD1 at end" >&2

python3 - "$RESULTS" "$RUNS" "$NREADS" "$HRATE" "$FIO_RUNTIME" "$MISMATCH" "$DW" "$SHAPE" <<'EOF'
import json, re, statistics, sys
path, runs, nreads, hrate, fio_rt, mismatch, dw, shape = sys.argv[1:]
recs = [json.loads(l) for l in open(path) if l.strip()]
timed = [r for r in recs if r["rep"] > 0]
DATA_MIB = 512

def hyd_secs(r):
    if r["tool"] == "nbdferry":
        return r["completed_at"] - r["t0"]
    if r["tool"] == "qemu":
        return r["stream_s"]
    return r["secs"]

def vals(case, tool, f):
    return [f(r) for r in timed if r["case"] == case and r["tool"] == tool]

def med(xs):
    return statistics.median(xs) if xs else float("nan")

def cell(xs, fmt):
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(med(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"

def okcount(case, tool):
    rs = [r for r in timed if r["case"] == case and r["tool"] == tool]
    n = sum(1 for r in rs if r.get("ok", True) and not r.get("bad"))
    return f"{n}/{len(rs)}" + ("" if n == len(rs) else " MISMATCH")

# Tools whose destination's CPU time is recorded ("cpu", seconds).
CPU_TOOLS = ("nbdferry", "copy", "copy-flush")

def goal(ok):
    return "" if ok else "  MISSED"

def link_bits(rate):
    """A tc rate (200mbit, 1gbit, 1000000bit) in bits/s."""
    m = re.fullmatch(r"([0-9.]+)([kmg]?)(bit|bps)", rate.lower())
    if not m:
        sys.exit(f"cannot read the tc rate {rate!r}")
    n = float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]]
    return n * 8 if m[3] == "bps" else n

LINK = link_bits(shape) if shape else None
where = f"a veth pair shaped to {shape} (tc tbf)" if LINK else "loopback TCP"
print(f"\npost-copy: 1 GiB image, {DATA_MIB} MiB data; source `nbdferry serve --read-only`, {where};"
      f" median (min-max) of {runs} rounds, tools alternated; destinations in {dw}")

def hydration():
    print(f"\n1. hydration: the whole disk arrives (verified against the image)")
    print(f"{'tool':58} {'seconds':>22} {'MiB/s data':>10} {'verified':>9} {'CPU s':>17}"
          + (f" {'of the link':>11}" if LINK else ""))
    rows = [("nbdferry serve --source (spawn -> complete)", "nbdferry"),
            ("nbdferry copy SRC dst.raw", "copy"),
            ("nbdferry copy --flush SRC dst.raw", "copy-flush"),
            ("nbdkit cow-on-read: nbdcopy URI null: (no bg pass)", "nbdkit"),
            ("qemu-storage-daemon block-stream (start -> COMPLETED)", "qemu")]
    if vals("hyd", "ceiling", hyd_secs):
        rows.append(("ceiling: fio writes the data durably there (direct, QD16)", "ceiling"))
    H = {}
    for label, tool in rows:
        xs = vals("hyd", tool, hyd_secs)
        H[tool] = med(xs)
        share = f" {DATA_MIB * 8 * 2**20 / H[tool] / LINK:11.1%}" if LINK else ""
        checked = okcount('hyd', tool) if tool != "ceiling" else "-"
        cpu = cell(vals("hyd", tool, lambda r: r["cpu"]) if tool in CPU_TOOLS else [], '{:.2f}')
        print(f"{label:58} {cell(xs, '{:.2f}'):>22} {DATA_MIB / H[tool]:10.0f} {checked:>9} {cpu:>17}{share}")
    f = H["nbdferry"]
    print(f"ratio copy / hydration = {H['copy'] / f:.3f} (goal >= 1.0){goal(H['copy'] / f >= 1.0)};"
          f" copy --flush / hydration = {H['copy-flush'] / f:.2f};"
          f" nbdkit / nbdferry = {H['nbdkit'] / f:.2f}; qemu / nbdferry = {H['qemu'] / f:.2f}")
    # Each round's pair, timed back to back: less of the machine's drift
    # than in the medians of each tool.
    by_rep = {(r["tool"], r["rep"]): hyd_secs(r) for r in timed if r["case"] == "hyd"}
    pairs = [by_rep["copy", n] / t for (tool, n), t in by_rep.items()
             if tool == "nbdferry" and ("copy", n) in by_rep]
    cpu = {t: med(vals("hyd", t, lambda r: r["cpu"])) for t in CPU_TOOLS}
    print(f"per round: copy / hydration median {med(pairs):.3f}, hydration no slower in"
          f" {sum(p >= 1 for p in pairs)} of {len(pairs)} rounds; CPU of the destination"
          f" (the daemon from spawn, the copy process): copy / hydration = {cpu['copy'] / cpu['nbdferry']:.2f}")
    if "ceiling" in H:
        print(f"hydration makes every block durable before it counts it (so does copy --flush; copy and nbdkit"
              f" leave their data in the page cache): ceiling / hydration = {H['ceiling'] / f:.2f},"
              f" ceiling / copy = {H['ceiling'] / H['copy']:.2f}")
    if LINK:
        use = DATA_MIB * 8 * 2**20 / f / LINK
        print(f"nbdferry moved the source's data at {use:.1%} of the link's {shape} (goal >= 90%){goal(use >= 0.9)};"
              f" at a 1500-byte MTU, TCP over IPv4 carries at most 1448 of every 1514 bytes (95.6%)")
    print("nbdkit has no background pass: its time is a full read through the filter, which fills its overlay")
    qb = [r.get("backing_left") for r in timed if r["case"] == "hyd" and r["tool"] == "qemu"]
    if any(qb):
        print(f"note: qemu overlays still name a backing file after block-stream: {qb}")


def first_reads():
    print(f"\n2. QD1 random 4 KiB first reads of absent blocks ({nreads} per run, one per 64 KiB block of data;"
          f" per-run median / p99, then median (min-max) over runs)")
    print(f"{'tool':46} {'median us':>20} {'p99 us':>22} {'med/plain':>9} {'p99/plain':>9} {'verified':>9}")
    P = (med(vals("first", "plain", lambda r: r["med_us"])), med(vals("first", "plain", lambda r: r["p99_us"])))
    for label, tool in [("plain nbdferry export of the source", "plain"),
                        ("nbdferry serve --source --rate 1", "nbdferry"),
                        ("nbdkit --filter=cow cow-on-read=true nbd", "nbdkit"),
                        ("qemu-storage-daemon qcow2 + copy-on-read", "qemu"),
                        ("two hops, nothing stored: nbdkit nbd plugin", "proxy")]:
        m = vals("first", tool, lambda r: r["med_us"])
        p = vals("first", tool, lambda r: r["p99_us"])
        mark = goal(med(m) / P[0] <= 2.0) if tool == "nbdferry" else ""
        print(f"{label:46} {cell(m, '{:.0f}'):>20} {cell(p, '{:.0f}'):>22} {med(m) / P[0]:9.2f}"
              f" {med(p) / P[1]:9.2f} {okcount('first', tool):>9}{mark}")
    print("goal: nbdferry median <= 2x plain (a first read costs a plain read here and one at the source:"
          " the reader's pages are fetched first, the rest of their block after the answer)")
    X = med(vals("first", "proxy", lambda r: r["med_us"]))
    print(f"floor: a pass-through proxy (the reader's request relayed to the source, its answer relayed back,"
          f" nothing stored) takes {X / P[0]:.2f}x plain; nbdferry / proxy = "
          f"{med(vals('first', 'nbdferry', lambda r: r['med_us'])) / X:.2f}")
    fr = [r for r in timed if r["case"] == "first" and r["tool"] == "nbdferry"]
    if fr:
        od = med([r["status"]["fetched_on_demand_bytes"] for r in fr])
        stop = med([r["stop_s"] for r in fr])
        print(f"nbdferry: fetched on demand {od / (1 << 20):.1f} MiB per run (64 KiB per read);"
              f" present after the reads {med([r['status']['present_bytes'] for r in fr]) / (1 << 20):.1f} MiB;"
              f" SIGTERM -> exit {stop:.2f} s")


def present_reads():
    print(f"\n3. reads of present blocks (last 128 MiB, pre-read) while nbdferry's pass runs at --rate {hrate}")
    print(f"{'tool':46} {'QD1 median us':>20} {'QD1 p99 us':>20} {'fio QD32 IOPS':>26} {'IOPS ratio':>10}"
          f" {'server CPU us/read':>20}")
    PI = med(vals("present", "plain", lambda r: r["iops"]))
    for label, tool in [("plain nbdferry export of the source", "plain"),
                        ("nbdferry serve --source, hydrating", "nbdferry"),
                        ("nbdferry serve --source, pass held (--rate 1)", "nbdferry-held"),
                        ("plain writable export (--state-dir, no --source)", "plain-rw")]:
        i = vals("present", tool, lambda r: r["iops"])
        mark = goal(med(i) / PI >= 0.9) if tool == "nbdferry" else ""
        print(f"{label:46} {cell(vals('present', tool, lambda r: r['med_us']), '{:.0f}'):>20}"
              f" {cell(vals('present', tool, lambda r: r['p99_us']), '{:.0f}'):>20}"
              f" {cell(i, '{:.0f}'):>26} {med(i) / PI:10.2f}"
              f" {cell(vals('present', tool, lambda r: r['cpu_us']), '{:.1f}'):>20}{mark}")
    print(f"goal: nbdferry IOPS >= 0.9x plain (fio randread 4k QD32, {fio_rt} s, one connection)")
    print("server CPU: the serving process's CPU time during fio, per read; while hydrating it includes"
          " the pass's own work, which shares this machine's cores with the reads")
    pr = [r for r in timed if r["case"] == "present" and r["tool"] == "nbdferry"]
    if pr:
        running = sum(1 for r in pr if not r["after"]["complete"]
                      and r["after"]["present_bytes"] > r["before"]["present_bytes"])
        grew = med([r["after"]["present_bytes"] - r["before"]["present_bytes"] for r in pr])
        od = med([r["after"]["fetched_on_demand_bytes"] - r["before"]["fetched_on_demand_bytes"] for r in pr])
        print(f"pass running through the fio window in {running}/{len(pr)} runs; it brought {grew / (1 << 20):.0f} MiB"
              f" meanwhile; on-demand fetches during the window: {od / (1 << 20):.1f} MiB")
    hr = [r for r in timed if r["case"] == "present" and r["tool"] == "nbdferry-held"]
    if hr:
        pb = med([r["before"]["present_bytes"] for r in hr])
        print(f"pass held: present after pre-reading the 128 MiB region: {pb / (1 << 20):.0f} MiB"
              f" (1 MiB of it from the pass, at offset 0)")


for case, table in [("hyd", hydration), ("first", first_reads), ("present", present_reads)]:
    if any(r["case"] == case for r in timed):
        table()

if mismatch != "0" or any(r.get("ok") is False or r.get("bad") for r in recs):
    print("\n!!!!!!!! MISMATCHES: a destination or a read differed from the source image !!!!!!!!")
    for r in recs:
        if r.get("ok") is False or r.get("bad"):
            print(json.dumps(r))
    sys.exit(1)
EOF
