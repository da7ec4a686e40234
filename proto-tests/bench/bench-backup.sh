#!/usr/bin/env bash
# Backup benchmark: `nbdferry backup pull` / `restore` (release build)
# against nbdcopy, restic and borg, on the 4 GiB sparse image of
# mk-image.py (1 GiB of data in 1 MiB runs, or --data-mib), in one run,
# alternating.
#
# Cases (each timed RUNS times, medians):
#   full      nbdferry backup pull from qemu-nbd (-r) into a new local
#             repository | nbdcopy of the export to a new sparse file |
#             restic backup and borg create of the image file, each into a
#             new repository (restic: no encryption is not offered, so its
#             default AES; borg: -e none; nbdferry: zstd, no key).
#             nbdferry, restic and borg make their data durable before they
#             finish; nbdcopy leaves it in the page cache, so nbdcopy
#             followed by `sync FILE` is timed too (the floor of a durable
#             copy, hashing aside).
#   incr      1% of the disk (41 MiB, 164 writes of 256 KiB at random
#             places) changed: nbdferry backup pull --bitmap from qemu-nbd
#             -B on the qcow2 | restic's second backup of the changed raw
#             image; reported against the full backup of the same tool
#   restore   nbdferry restore of the full point to qemu-nbd
#             (--discard=unmap, fresh sparse target) | nbdcopy upload of
#             the image to the same kind of target
# Also prints the repository size after the incremental against the data
# that changed, and the changed data's share of the full's data: the
# incremental's time ratio cannot go below it by much (on the default
# image, 1% of the disk is 4% of its data).
#
# Usage: proto-tests/bench/bench-backup.sh [--runs N] [--no-build] [--keep]
#             [--chunk-size SIZE] [--cases LIST] [--data-mib N]
#   --runs N             timed runs per case and tool (default 3)
#   --chunk-size SIZE    chunk size of nbdferry's repositories (default:
#                        nbdferry's own); run once per size to choose it
#   --cases LIST         comma-separated, of full,restore,incr (default all;
#                        restore restores full's point, so runs full too)
#   --data-mib N         MiB of data in the 4 GiB image (default 1024;
#                        4096: every block allocated, so that 1% of the
#                        disk is 1% of the data; needs ~16 GB free for incr)
# Needs: cargo, qemu-utils, libnbd-bin, restic, borgbackup, python3, ss;
# for full, ~3 GB free per run (every tool's repositories stay to the end).
set -euo pipefail

# shellcheck source=proto-tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=3
CHUNK=""
CASES=full,restore,incr
DATA_MIB=1024
bench_parse_args 39 --chunk-size=CHUNK --cases=CASES --data-mib=DATA_MIB -- "$@"
CHUNK_ARGS=()
[ -z "$CHUNK" ] || CHUNK_ARGS=(--chunk-size "$CHUNK")
for c in ${CASES//,/ }; do
    case "$c" in full|restore|incr) ;; *) echo "unknown case: $c" >&2; exit 2 ;; esac
done
want() { [[ ",$CASES," == *",$1,"* ]]; }
CHANGED=$((164 * 262144)) # what the incr case writes (before overlaps)
# restore restores the full case's last point.
if want restore && ! want full; then CASES="full,$CASES"; fi
bench_need_tools qemu-nbd qemu-img qemu-io nbdcopy restic borg python3 ss
bench_build
bench_tmpdir WORK /var/tmp/bench-backup.XXXXXX
bench_make_image "$DATA_MIB"
LOG="$WORK/servers.log"
export RESTIC_PASSWORD=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes

QCOW="$WORK/img.qcow2"
qemu-img convert -f raw -O qcow2 "$IMG" "$QCOW"

# start_qemu [ARGS...]: qemu-nbd on the qcow2 with ARGS, sets URI.
start_qcow() {
    PORT=$(free_port)
    qemu-nbd -t -e 8 -f qcow2 -r -x disk -b 127.0.0.1 -p "$PORT" "$@" "$QCOW" 2>>"$LOG" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_listen "$PORT" "$SERVER_PID"
    URI="nbd://127.0.0.1:$PORT/disk"
}

timed() { local t0 t1; t0=$(now); "$@" >/dev/null 2>>"$LOG"; t1=$(now); elapsed "$t0" "$t1"; }

declare -A T=()
add() { T[$1]="${T[$1]:-} $2"; }

# Every repository (ours, restic's, borg's) stays until the end of the
# script: deleting one's files just before the next run makes every file
# creation of that run scan the freshly freed inodes (ext4 without a
# journal, as on this VM's root, skips inodes deleted in the last minutes;
# measured: 40% of the backup's CPU in ext4_create, and a fresh restic
# repository alone is 256 folders). Steady use never deletes a whole
# repository before a backup.
if want full; then
    start_qcow
    for r in $(seq 0 "$RUNS"); do
        rm -f "$WORK/out.raw"
        ln -sfn "repo.$r" "$WORK/repo"
        a=$(timed "$BIN" backup pull "$URI" --repo "$WORK/repo.$r" --disk d "${CHUNK_ARGS[@]}")
        b=$(timed nbdcopy "$URI" "$WORK/out.raw")
        rm -f "$WORK/out.raw"
        bs=$(timed sh -c 'nbdcopy "$1" "$2" && sync "$2"' sh "$URI" "$WORK/out.raw")
        restic init --repo "$WORK/restic.$r" >/dev/null 2>&1
        c=$(timed restic backup --repo "$WORK/restic.$r" --no-cache "$IMG")
        borg init -e none "$WORK/borg.$r" >/dev/null 2>&1
        d=$(timed borg create "$WORK/borg.$r::a" "$IMG")
        if [ "$r" -gt 0 ]; then # run 0 warms up
            add full,nbdferry "$a"; add full,nbdcopy "$b"; add full,restic "$c"; add full,borg "$d"
            add full,durable "$bs"
            echo "   full run $r: nbdferry ${a}s nbdcopy ${b}s nbdcopy+sync ${bs}s restic ${c}s borg ${d}s" >&2
        fi
    done
    cmp -s "$WORK/out.raw" "$IMG" || { echo "nbdcopy copy differs" >&2; exit 1; }
    rm -f "$WORK/out.raw"
fi

if want restore; then
    # Restore of the last full point vs upload of the image, to qemu-nbd.
    for r in $(seq 0 "$RUNS"); do
        for tool in nbdferry nbdcopy; do
            rm -f "$WORK/target.raw"
            truncate -s "$VSIZE" "$WORK/target.raw"
            P=$(free_port)
            qemu-nbd -t -e 8 -f raw --discard=unmap -x t -b 127.0.0.1 -p "$P" "$WORK/target.raw" 2>>"$LOG" &
            TP=$!
            PIDS+=("$TP")
            wait_listen "$P" "$TP"
            if [ $tool = nbdferry ]; then
                t=$(timed "$BIN" restore --repo "$WORK/repo" d "nbd://127.0.0.1:$P/t")
            else
                t=$(timed nbdcopy "$IMG" "nbd://127.0.0.1:$P/t")
            fi
            bench_stop "$TP"
            cmp -s "$WORK/target.raw" "$IMG" || { echo "$tool restore differs" >&2; exit 1; }
            if [ "$r" -gt 0 ]; then add restore,$tool "$t"; echo "   restore run $r $tool: ${t}s" >&2; fi
        done
    done
fi
if want full; then bench_stop "$SERVER_PID"; fi

if want incr; then
    # Incremental: a full point with the bitmap started, 1% changed, then the
    # incremental; restic's second backup of the same change to the raw image.
    for r in $(seq 1 "$RUNS"); do
        rm -rf "$WORK/restic"
        qemu-img convert -f raw -O qcow2 "$IMG" "$QCOW"
        qemu-img bitmap -f qcow2 --add "$QCOW" b0
        start_qcow -B b0
        full=$(timed "$BIN" backup pull "$URI" --repo "$WORK/irepo.$r" --disk d --bitmap b0 "${CHUNK_ARGS[@]}")
        bench_stop "$SERVER_PID"
        cp --sparse=always "$IMG" "$WORK/changed.raw"
        restic init --repo "$WORK/restic" >/dev/null 2>&1
        rfull=$(timed restic backup --repo "$WORK/restic" --no-cache "$WORK/changed.raw")
        before=$(du -sb "$WORK/irepo.$r" | cut -f1)
        cmds=()
        for i in $(seq 164); do
            off=$(( (RANDOM * 32768 + RANDOM) % (VSIZE / 262144) * 262144 ))
            cmds+=(-c "write -P $((i % 250 + 1)) $off 256K")
            printf '%*s' 262144 '' | tr ' ' "$(printf "\\$(printf %o $((i % 26 + 65)))")" |
                dd of="$WORK/changed.raw" bs=256K seek=$((off / 262144)) conv=notrunc status=none
        done
        qemu-io -f qcow2 "${cmds[@]}" "$QCOW" >/dev/null
        start_qcow -B b0
        incr=$(timed "$BIN" backup pull "$URI" --repo "$WORK/irepo.$r" --disk d --bitmap b0)
        bench_stop "$SERVER_PID"
        rincr=$(timed restic backup --repo "$WORK/restic" --no-cache "$WORK/changed.raw")
        after=$(du -sb "$WORK/irepo.$r" | cut -f1)
        add incr,nbdferry "$incr"; add incrfull,nbdferry "$full"
        add incr,restic "$rincr"; add incrfull,restic "$rfull"
        echo "   incr run $r: nbdferry full ${full}s incr ${incr}s; restic full ${rfull}s second ${rincr}s; repo grew $((after - before)) bytes for $CHANGED changed" >&2
        rm -f "$WORK/changed.raw"
    done
fi

m() { # shellcheck disable=SC2086
    python3 -c 'import sys; print(f"{float(sys.argv[1]):.2f}")' "$(median ${T[$1]})"; }
echo
echo "median seconds over $RUNS runs (4 GiB image, $DATA_MIB MiB data)"
printf '%-10s %10s %10s %10s %10s\n' case nbdferry nbdcopy restic borg
if want full; then
    printf '%-10s %10s %10s %10s %10s\n' full "$(m full,nbdferry)" "$(m full,nbdcopy)" "$(m full,restic)" "$(m full,borg)"
    python3 -c 'import sys; f, nc, rs, bg, d = map(float, sys.argv[1:]); print(f"full:    nbdferry speed / nbdcopy {nc / f:.2f}x (/ nbdcopy+sync, a durable copy: {d / f:.2f}x), / restic {rs / f:.2f}x, / borg {bg / f:.2f}x")' \
        "$(m full,nbdferry)" "$(m full,nbdcopy)" "$(m full,restic)" "$(m full,borg)" "$(m full,durable)"
fi
if want restore; then
    printf '%-10s %10s %10s\n' restore "$(m restore,nbdferry)" "$(m restore,nbdcopy)"
    python3 -c 'import sys; rf, ru = map(float, sys.argv[1:]); print(f"restore: nbdferry speed / nbdcopy upload {ru / rf:.2f}x")' \
        "$(m restore,nbdferry)" "$(m restore,nbdcopy)"
fi
if want incr; then
    printf '%-10s %10s %10s %10s\n' "incr" "$(m incr,nbdferry)" "-" "$(m incr,restic)"
    python3 - "$(m incr,nbdferry)" "$(m incrfull,nbdferry)" "$(m incr,restic)" "$(m incrfull,restic)" \
        "$DSIZE" "$CHANGED" <<'EOF'
import sys
i, ifull, ri, rifull, data, changed = map(float, sys.argv[1:])
print(f"incr:    nbdferry incremental / its full {100 * i / ifull:.1f}% "
      f"(the changed {changed / 2**20:.0f} MiB are {100 * changed / data:.1f}% of the full's data; "
      f"restic second / its first {100 * ri / rifull:.1f}%; nbdferry vs restic second {ri / i:.2f}x)")
EOF
fi
