#!/usr/bin/env python3
"""Checks and summarises one run of bench-mirror.sh; prints one JSON line.

  mirror-check.py --case C --tool T --rep N [--drive OUT.json]
                  [--writer-log LOG --seed S] [--src SRC --dst DST] [--hold S]

Correctness (with --src/--dst, after every server of the run has stopped):
  - every 64 KiB block the writer wrote must hold, on the destination, the
    data of the last write to it that succeeded (mirror-writer.py's data
    is regenerated from its seed and sequence number);
  - every other block must be equal on source and destination, except, for
    qemu, blocks written after `job-complete` was sent (qemu switches the
    export over to the destination, so such writes may land there only;
    they are checked by the rule above);
  - nbdferry refuses writes after completion, so for it source and
    destination must be identical, block for block.
"ok": false and a list of bad blocks otherwise.

Numbers: time to ready, downtime, the writer's achieved rate, its QD1
latency (median, p99) while the mirror is ready (the --hold window minus
0.5 s at each end; no mirror: the whole run minus its first 0.5 s), and
the longest write around completion (the freeze the writer saw).
Standard library only.
"""
import argparse
import json
import os
import random
import statistics
import struct

BS = 64 * 1024
POOL = 64
MIB = 1 << 20


def pool(seed):
    rng = random.Random(seed)
    return [rng.randbytes(BS) for _ in range(POOL)]


def expected(blocks, seq):
    b = bytearray(blocks[seq % POOL])
    b[0:8] = struct.pack("<Q", seq)
    return bytes(b)


def read_log(path):
    rows = []
    with open(path) as f:
        for line in f:
            seq, off, t0, t1, ok = line.split()
            rows.append((int(seq), int(off), float(t0), float(t1), ok == "1"))
    return rows


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def differing_blocks(src, dst):
    bad = []
    with open(src, "rb") as a, open(dst, "rb") as b:
        if os.fstat(a.fileno()).st_size != os.fstat(b.fileno()).st_size:
            return None
        pos = 0
        while True:
            x, y = a.read(MIB), b.read(MIB)
            if not x and not y:
                break
            if x != y:
                for i in range(0, max(len(x), len(y)), BS):
                    if x[i:i + BS] != y[i:i + BS]:
                        bad.append(pos + i)
            pos += MIB
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--tool", required=True)
    ap.add_argument("--rep", type=int, required=True)
    ap.add_argument("--drive")
    ap.add_argument("--writer-log")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--src")
    ap.add_argument("--dst")
    ap.add_argument("--hold", type=float, default=0)
    a = ap.parse_args()
    d = json.load(open(a.drive)) if a.drive else {}
    r = {"case": a.case, "tool": a.tool, "rep": a.rep}
    if d:
        r["ready"] = d["ready"]
        r["ready_s"] = d["t_ready"] - d["t_start"] if d["ready"] else None
        r["switched"] = d["t_switch"] is not None
        r["ready_after_switch_s"] = (d["t_ready"] - d["t_switch"]
                                     if d["ready"] and d["t_switch"] else None)
        if d.get("left_at_switch") is not None:
            r["left_at_switch_mib"] = d["left_at_switch"] / MIB
        if d.get("t_bulk_end"):
            r["bulk_s"] = d["t_bulk_end"] - d["t_start"]
        if d["ready"]:
            r["complete_ms"] = (d["t_completed"] - d["t_complete"]) * 1000
            r["downtime_ms"] = d.get("downtime_ms")
            r["bytes_sent"] = d.get("bytes_sent")
            r["passes"] = d.get("passes")
            r["ready_at_complete"] = d.get("ready_at_complete")
    rows = read_log(a.writer_log) if a.writer_log else []
    if rows:
        okrows = [x for x in rows if x[4]]
        end = d.get("t_complete", rows[-1][3]) if d else rows[-1][3]
        first = rows[0][2]
        inrun = [x for x in okrows if x[3] <= end]
        r["writes"] = len(rows)
        r["write_mib_s"] = len(inrun) * BS / MIB / max(1e-9, end - first)
        if d and d.get("ready") and a.hold:
            w0, w1 = d["t_ready"] + 0.5, d["t_ready"] + a.hold - 0.5
        elif not d:
            w0, w1 = first + 0.5, rows[-1][3]
        else:
            w0 = w1 = None
        if w0 is not None:
            lat = [(x[3] - x[2]) * 1000 for x in okrows if w0 <= x[2] and x[3] <= w1]
            if lat:
                r["lat_n"] = len(lat)
                r["lat_med_ms"] = statistics.median(lat)
                r["lat_p99_ms"] = pct(lat, 99)
        if d and d.get("ready"):
            c0, c1 = d["t_complete"], d["t_completed"]
            around = [(x[3] - x[2]) * 1000 for x in rows if x[2] <= c1 and x[3] >= c0]
            r["stall_ms"] = max(around) if around else None
        r["refused_writes"] = sum(1 for x in rows if not x[4])
    if a.src and a.dst:
        problems = []
        bad = differing_blocks(a.src, a.dst)
        if bad is None:
            problems.append("sizes differ")
            bad = []
        late = set()
        last = {}
        for seq, off, t0, t1, ok in rows:
            if ok:
                last[off] = seq
            if d.get("t_complete") and t1 >= d["t_complete"]:
                late.add(off)
        allowed = late if a.tool == "qemu" else set()
        for off in bad:
            if off not in allowed:
                problems.append(f"block {off}: source and destination differ")
        blocks = pool(a.seed) if last else None
        with open(a.dst, "rb") as f:
            for off, seq in sorted(last.items()):
                if os.pread(f.fileno(), BS, off) != expected(blocks, seq):
                    problems.append(f"block {off}: not the data of write {seq}, the last one there")
        r["blocks_differing"] = len(bad)
        r["ok"] = not problems
        if problems:
            r["problems"] = problems[:20] + ([f"... {len(problems) - 20} more"]
                                             if len(problems) > 20 else [])
    print(json.dumps(r))


if __name__ == "__main__":
    main()
