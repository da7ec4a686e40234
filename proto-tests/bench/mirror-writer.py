#!/usr/bin/python3
"""The guest of bench-mirror.sh: random 64 KiB writes at a fixed rate, one
at a time (QD1), over one NBD connection, until SIGTERM or a refused write.

Usage: /usr/bin/python3 mirror-writer.py URI RATE_BYTES_PER_S SEED LOG

Runs under Debian's /usr/bin/python3 (libnbd's `nbd` module is only there).
Every write is 64 KiB at a 64 KiB-aligned random offset; its data is one of
64 pseudo-random blocks (from SEED, so mirror-check.py can regenerate it)
with the write's sequence number stamped in its first 8 bytes, so every
write is distinct and the last write to a block can be recognised.
Pacing: write n is issued no earlier than n*64KiB/RATE after the start; a
slow write delays the ones after it (the rate is a ceiling, like a guest
waiting on its disk).

LOG (written at exit): one line per write,
    seq offset t_issue t_done ok
(wall-clock seconds, comparable with the QMP event timestamps and
mirror-drive.py's stamps; ok 0: the write failed, e.g. refused after
`mirror complete`; the writer stops at the first failure).
"""
import os
import random
import signal
import struct
import sys
import time

import nbd

BS = 64 * 1024
POOL = 64


def pool(seed):
    rng = random.Random(seed)
    return [rng.randbytes(BS) for _ in range(POOL)]


def main():
    uri, rate, seed, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    blocks = pool(seed)
    rng = random.Random(seed + 1)
    h = nbd.NBD()
    h.connect_uri(uri)
    nblocks = h.get_size() // BS
    rows = []
    stop = False

    def on_term(_sig, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    start = time.monotonic()
    seq = 0
    try:
        while not stop:
            due = start + seq * BS / rate
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
                if stop:
                    break
            off = rng.randrange(nblocks) * BS
            buf = bytearray(blocks[seq % POOL])
            buf[0:8] = struct.pack("<Q", seq)
            t0 = time.time()
            ok = 1
            try:
                h.pwrite(buf, off)
            except nbd.Error:
                ok = 0
            rows.append(f"{seq} {off} {t0:.6f} {time.time():.6f} {ok}\n")
            seq += 1
            if not ok:
                break
    finally:
        with open(log, "w") as f:
            f.writelines(rows)
    # Stay until told to stop, so that the caller's kill finds us alive.
    while not stop:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
