#!/usr/bin/env bash
# Pre-copy mirror benchmark: nbdferry's mirror job against qemu's
# (qemu-storage-daemon, blockdev-mirror sync=full over QMP), same image,
# same guest writer, same destination, runs alternated.
#
# Image: 1 GiB raw, half allocated (mk-image.py --size-mib 1024 --runs 512:
# 512 runs of 1 MiB random data), copied fresh for every run.
# Source: `nbdferry serve` (state dir fresh per run), or qemu-storage-daemon
#   with the image as a raw blockdev exported over NBD by its own
#   --nbd-server/--export; both on 127.0.0.1 TCP.
# Destination: a fresh sparse 1 GiB file behind qemu-nbd (-t -e 8), for
#   both: a neutral third-party export on loopback.
# Guest: mirror-writer.py, random 64 KiB writes, QD1, at a fixed rate, over
#   NBD to the source export (libnbd, /usr/bin/python3), logging each write.
# Jobs: mirror-drive.py (nbdferry: the `mirror` CLI; qemu: QMP).
#
# Cases (each run per tool, tools alternated, first tool rotated per rep):
#   bg0    background, no writer            -> time to ready = bulk phase
#   act0   active / write-blocking, no writer
#   bg10   background, writer 10 MiB/s, HOLD s ready before completing
#   act10  active / write-blocking, writer 10 MiB/s, HOLD s ready
#   over   background with the copier limited to LINK (nbdferry --rate,
#          qemu speed: this emulates a slow link for the copier only; no
#          tc/netns), writer OVER > LINK; not ready after BGWAIT s -> switch
#          to active (nbdferry `mirror set --mode active`, qemu
#          block-job-change copy-mode=write-blocking) and time to ready
#   lat    no mirror: the 10 MiB/s writer alone for HOLD s (latency baseline)
#   dst    the same writer straight at the destination (qemu-nbd), no
#          source: one destination round trip per write, the most an
#          active mirror may add (tool column "dest")
#   copy   `nbdferry copy --flush IMG nbd://dest` (nbdferry only): the bulk
#          phase's reference
# Downtime: nbdferry's downtime_ms (daemon held client writes) and the
# `mirror complete` command's wall time; qemu: job-complete ->
# BLOCK_JOB_COMPLETED, during which qemu still takes guest writes (it drains
# only for the final switch). For both, "stall": the longest writer write
# overlapping the completion interval = the freeze the guest saw.
# Every run is verified (mirror-check.py): a mismatch is printed loudly,
# the table marks it and the script exits 1.
#
# Two hosts (--shape RATE, root only): the script runs itself again in a
# network namespace (source, writer, jobs) and puts the destination in a
# second one, joined by a veth pair shaped with `tc tbf` at RATE (a tc
# rate: 1gbit, 200mbit) both ways; the namespaces go at exit.
#
# Usage: proto-tests/bench/bench-mirror.sh [--runs N] [--hold S] [--link BYTES/s]
#        [--over BYTES/s] [--bgwait S] [--cases "bg10 act10 ..."] [--shape RATE]
#        [--no-build] [--keep]
#   NBDFERRY_BIN=path overrides the binary.
# Needs: cargo, qemu-storage-daemon, qemu-nbd, python3, /usr/bin/python3
# with libnbd's module (python3-libnbd); iproute2 for --shape.
set -euo pipefail

# shellcheck source=proto-tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
HOLD=8
LINK=$((32 << 20))
OVER=$((48 << 20))
BGWAIT=30
SLOW=$((10 << 20))
CASES_ARG="bg0 act0 bg10 act10 over lat dst copy"
SHAPE=""
DST_NS=""
ARGS=("$@")
bench_parse_args 48 --hold=HOLD --link=LINK --over=OVER --bgwait=BGWAIT --cases=CASES_ARG \
    --shape=SHAPE --dst-ns=DST_NS -- "$@"
bench_need_tools qemu-storage-daemon qemu-nbd python3 /usr/bin/python3
/usr/bin/python3 -c 'import nbd' || { echo "/usr/bin/python3 has no nbd module" >&2; exit 1; }
DST_ADDR=127.0.0.1
if [ -n "$SHAPE" ] && [ -z "$DST_NS" ]; then
    bench_two_hosts nfmirror "$SHAPE"
    bench_build
    echo "two hosts: $NS_A (source) and $NS_B (destination, 10.203.0.2), veth shaped to $SHAPE" >&2
    ip netns exec "$NS_A" "$0" "${ARGS[@]}" --no-build --dst-ns "$NS_B"
    exit $?
fi
if [ -n "$DST_NS" ]; then DST_ADDR=10.203.0.2; fi
bench_build

bench_tmpdir WORK /tmp/nbdferry-mirrorbench.XXXXXX
BASE="$WORK/base.raw"
python3 "$HERE/mk-image.py" "$BASE" --size-mib 1024 --runs 512 >&2
SRC="$WORK/src.raw"
DST="$WORK/dst.raw"
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
echo "machine: $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg) at start" >&2
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
T_BEGIN=$(date +%s)

# start_dst: a fresh empty destination behind qemu-nbd. Sets DST_PID, DST_URI.
start_dst() {
    rm -f "$DST"
    truncate -s 1G "$DST"
    if [ -n "$DST_NS" ]; then
        # The only server in its namespace: the port is free.
        PORT=10809
        ip netns exec "$DST_NS" qemu-nbd -t -e 8 -f raw -b "$DST_ADDR" -p "$PORT" -x disk "$DST" \
            2>>"$WORK/dst.log" &
        DST_PID=$!
        PIDS+=("$DST_PID")
        for _ in $(seq 200); do
            ip netns exec "$DST_NS" ss -Hltn "sport = :$PORT" | grep -q . && break
            kill -0 "$DST_PID" 2>/dev/null || { echo "qemu-nbd died: $WORK/dst.log" >&2; exit 1; }
            sleep 0.05
        done
    else
        bench_start_qemu "$WORK/dst.log" -x disk "$DST"
        DST_PID=$SERVER_PID
    fi
    DST_PORT=$PORT
    DST_URI="nbd://$DST_ADDR:$PORT/disk"
}

# start_src TOOL: a fresh copy of the image behind TOOL's server.
# Sets SRC_PID, SRC_URI (and ST or QMP).
start_src() {
    rm -f "$SRC"
    cp --sparse=always "$BASE" "$SRC"
    # The copy's writeback would otherwise run under the timed writes
    # (for ~30 s: the kernel's dirty expiry), and under a flush of it.
    sync
    case "$1" in
        nbdferry)
            ST="$WORK/state"
            rm -rf "$ST"
            bench_start_ferry nbdferry "$WORK/src.log" serve --listen 127.0.0.1:0 \
                --name disk --state-dir "$ST" "$SRC"
            SRC_PID=$SERVER_PID
            ;;
        qemu)
            QMP="$WORK/qmp.sock"
            rm -f "$QMP"
            PORT=$(free_port)
            qemu-storage-daemon \
                --blockdev "driver=file,node-name=f0,filename=$SRC" \
                --blockdev driver=raw,node-name=src,file=f0 \
                --chardev "socket,path=$QMP,server=on,wait=off,id=c0" --monitor chardev=c0 \
                --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$PORT" \
                --export type=nbd,id=e0,node-name=src,name=disk,writable=on \
                2>>"$WORK/qsd.log" &
            SRC_PID=$!
            PIDS+=("$SRC_PID")
            wait_listen "$PORT" "$SRC_PID"
            for _ in $(seq 100); do [ -S "$QMP" ] && break; sleep 0.05; done
            ;;
    esac
    SRC_URI="nbd://127.0.0.1:$PORT/disk"
}

# start_writer RATE SEED [URI]: the guest, if RATE > 0, writing to URI
# (default: the source). Sets WRITER_PID, WLOG.
start_writer() {
    WRITER_PID=""
    WLOG=""
    [ "$1" -gt 0 ] || return 0
    WLOG="$WORK/writer.log"
    rm -f "$WLOG"
    /usr/bin/python3 "$HERE/mirror-writer.py" "${3:-$SRC_URI}" "$1" "$2" "$WLOG" &
    WRITER_PID=$!
    PIDS+=("$WRITER_PID")
    sleep 0.5 # connected and writing before the job starts
}

SEED=0
# run_case CASE TOOL REP: one run, its record appended to $RESULTS.
run_case() {
    local c="$1" tool="$2" rep="$3" mode=background rate=0 copier=0 wait=120 sw="" hold=0
    local drive=() out="$WORK/drive.json" check=()
    case "$c" in
        bg0) ;;
        act0) mode=active ;;
        bg10) rate=$SLOW; hold=$HOLD ;;
        act10) mode=active; rate=$SLOW; hold=$HOLD ;;
        over) rate=$OVER; copier=$LINK; wait=$BGWAIT; sw=--switch ;;
        lat) rate=$SLOW ;;
    esac
    SEED=$((SEED + 1))
    start_dst
    start_src "$tool"
    start_writer "$rate" "$SEED"
    if [ "$c" = lat ]; then
        sleep "$HOLD"
    else
        if [ "$tool" = nbdferry ]; then
            drive=(nbdferry --bin "$BIN" --admin "$ST/admin.sock" --to "$DST_URI")
        else
            drive=(qemu --qmp "$QMP" --to-host "$DST_ADDR" --to-port "$DST_PORT")
        fi
        drive+=(--mode "$mode" --rate "$copier" --ready-timeout "$wait" --hold "$hold" $sw)
        if ! python3 "$HERE/mirror-drive.py" "${drive[@]}" >"$out"; then
            echo "!!! $c $tool run $rep: the job driver failed (see $WORK/*.log)" >&2
            echo '{"ready": false, "t_start": 0, "t_ready": null, "t_switch": null, "driver_failed": true}' >"$out"
        fi
        check+=(--drive "$out" --src "$SRC" --dst "$DST")
    fi
    if [ -n "$WRITER_PID" ]; then bench_stop "$WRITER_PID"; fi
    bench_stop "$SRC_PID"
    bench_stop "$DST_PID"
    if [ -n "$WLOG" ] && [ -s "$WLOG" ]; then check+=(--writer-log "$WLOG" --seed "$SEED"); fi
    python3 "$HERE/mirror-check.py" --case "$c" --tool "$tool" --rep "$rep" --hold "$hold" \
        "${check[@]}" >>"$RESULTS"
    local last
    last=$(tail -n1 "$RESULTS")
    echo "   $c $tool run $rep: $last" >&2
    if grep -q '"ok": false' <<<"$last"; then
        echo "!!!!!!!! MISMATCH: $c $tool run $rep: destination differs from source !!!!!!!!" >&2
        cp "$WORK/drive.json" "$WORK/mismatch-$c-$tool-$rep.json" 2>/dev/null || true
    fi
}

# dst_case REP: the writer straight at the destination, for HOLD s.
dst_case() {
    SEED=$((SEED + 1))
    start_dst
    start_writer "$SLOW" "$SEED" "$DST_URI"
    sleep "$HOLD"
    bench_stop "$WRITER_PID"
    bench_stop "$DST_PID"
    [ -s "$WLOG" ] || { echo "!!! dst run $1: the writer logged nothing" >&2; return 0; }
    python3 "$HERE/mirror-check.py" --case lat --tool dest --rep "$1" --hold 0 \
        --writer-log "$WLOG" --seed "$SEED" >>"$RESULTS"
    echo "   dst run $1: $(tail -n1 "$RESULTS")" >&2
}

# copy_case REP: nbdferry copy of the image file to the same destination.
copy_case() {
    local t0 t1
    start_dst
    rm -f "$SRC"
    cp --sparse=always "$BASE" "$SRC"
    sync
    t0=$(now)
    "$BIN" copy --flush --progress=none "$SRC" "$DST_URI"
    t1=$(now)
    bench_stop "$DST_PID"
    local ok=true
    cmp -s "$SRC" "$DST" || ok=false
    echo "{\"case\": \"copy\", \"tool\": \"nbdferry\", \"rep\": $1, \"copy_s\": $(elapsed "$t0" "$t1"), \"ok\": $ok}" >>"$RESULTS"
    echo "   copy run $1: $(tail -n1 "$RESULTS")" >&2
}

read -r -a CASES <<<"$CASES_ARG"
TOOLS=(nbdferry qemu)
for r in $(seq "$RUNS"); do
    for c in "${CASES[@]}"; do
        case "$c" in
            copy) copy_case "$r" ;;
            dst) dst_case "$r" ;;
            bg0 | act0 | bg10 | act10 | over | lat)
                for i in 0 1; do
                    run_case "$c" "${TOOLS[$(((i + r - 1) % 2))]}" "$r"
                done
                ;;
            *) echo "unknown case: $c" >&2; exit 2 ;;
        esac
    done
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench time $(($(date +%s) - T_BEGIN)) s; load $LOAD0 at start, $LOAD1 at end" >&2

python3 - "$RESULTS" "$RUNS" "$HOLD" "$LINK" "$OVER" "$BGWAIT" "$SLOW" <<'EOF'
import json, statistics, sys
path, runs, hold, link, over, bgwait, slow = sys.argv[1:]
recs = [json.loads(l) for l in open(path)]
MIB = 1 << 20
DATA = 512 * MIB

def vals(case, tool, key):
    return [r[key] for r in recs if r["case"] == case and r["tool"] == tool and r.get(key) is not None]

def cell(xs, fmt="{:.2f}"):
    if not xs:
        return "-"
    m = statistics.median(xs)
    if len(xs) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"

def okcount(case, tool):
    rs = [r for r in recs if r["case"] == case and r["tool"] == tool and "ok" in r]
    n = sum(1 for r in rs if r["ok"])
    return f"{n}/{len(rs)}" + ("" if n == len(rs) else " MISMATCH")

print(f"\nmedian (min-max) of {runs} runs; 1 GiB image, 512 MiB data; writer QD1 64 KiB random;"
      f" hold {hold} s; over: copier {int(link)//MIB} MiB/s, writer {int(over)//MIB} MiB/s, switch after {bgwait} s")
hdr = (f"{'case':6} {'tool':8} {'ready':>6} {'ready s':>20} {'left@switch MiB':>18} {'after switch s':>18} {'complete ms':>22}"
       f" {'held ms':>16} {'stall ms':>22} {'writer MiB/s':>20} {'verified':>9}")
print(hdr)
for case in ["bg0", "act0", "bg10", "act10", "over"]:
    for tool in ["nbdferry", "qemu"]:
        rs = [r for r in recs if r["case"] == case and r["tool"] == tool]
        ready = f"{sum(1 for r in rs if r.get('ready') and not r.get('switched'))}/{len(rs)}"
        print(f"{case:6} {tool:8} {ready:>6} {cell(vals(case, tool, 'ready_s')):>20}"
              f" {cell(vals(case, tool, 'left_at_switch_mib'), '{:.0f}'):>18}"
              f" {cell(vals(case, tool, 'ready_after_switch_s')):>18}"
              f" {cell(vals(case, tool, 'complete_ms'), '{:.0f}'):>22}"
              f" {cell(vals(case, tool, 'downtime_ms'), '{:.0f}'):>16}"
              f" {cell(vals(case, tool, 'stall_ms'), '{:.1f}'):>22}"
              f" {cell(vals(case, tool, 'write_mib_s'), '{:.1f}'):>20} {okcount(case, tool):>9}")
print("ready: runs ready without a switch to active; left@switch: not yet on the destination when background"
      " gave up (nbdferry dirty_bytes, qemu len-offset); ready s: start -> ready (after the switch, if any);"
      " complete ms: nbdferry = `mirror complete` wall time,"
      " qemu = job-complete -> BLOCK_JOB_COMPLETED (guest writes NOT held meanwhile);"
      " held ms: nbdferry downtime_ms; stall ms: longest guest write overlapping completion")

print(f"\nbulk phase: 512 MiB of data (the rest holes) to the same qemu-nbd destination")
for label, case, tool in [("nbdferry mirror bg0 (start -> ready)", "bg0", "nbdferry"),
                          ("nbdferry mirror bg10 (start -> bulk pass done)", "bg10", "nbdferry"),
                          ("qemu mirror bg0 (start -> BLOCK_JOB_READY)", "bg0", "qemu"),
                          ("nbdferry mirror act0 (start -> ready)", "act0", "nbdferry"),
                          ("qemu mirror act0 (write-blocking)", "act0", "qemu"),
                          ("nbdferry copy --flush IMG nbd://dst", "copy", "nbdferry")]:
    key = "bulk_s" if "bulk pass" in label else ("copy_s" if case == "copy" else "ready_s")
    xs = vals(case, tool, key)
    mbs = [DATA / MIB / x for x in xs]
    print(f"  {label:50} {cell(xs, '{:.2f}'):>20} s   {cell(mbs, '{:.0f}'):>18} MiB/s of data")

print(f"\nQD1 64 KiB write latency at {int(slow)//MIB} MiB/s, ms, while the mirror is ready"
      f" (hold window minus 0.5 s each end; per-run median/p99, then median (min-max) over runs)")
print(f"{'tool':8} {'state':24} {'median ms':>22} {'p99 ms':>22} {'samples/run':>12}")
for tool in ["dest", "nbdferry", "qemu"]:
    states = [("lat", "no mirror"), ("bg10", "background mirror"), ("act10", "active / write-blocking")]
    for case, state in [("lat", "destination alone")] if tool == "dest" else states:
        print(f"{tool:8} {state:24} {cell(vals(case, tool, 'lat_med_ms'), '{:.3f}'):>22}"
              f" {cell(vals(case, tool, 'lat_p99_ms'), '{:.3f}'):>22}"
              f" {cell(vals(case, tool, 'lat_n'), '{:.0f}'):>12}")
bad = [r for r in recs if r.get("ok") is False]
if bad:
    print("\n!!!!!!!! DESTINATION MISMATCHES !!!!!!!!")
    for r in bad:
        print(json.dumps(r))
    sys.exit(1)
EOF
