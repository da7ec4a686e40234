#!/usr/bin/env python3
"""Make the benchmark image: a sparse raw file (default 4 GiB) holding
RUNS runs of 1 MiB pseudo-random data at distinct random 1 MiB-aligned
offsets (default 1024 runs = 25% data); everything else is a hole.

Usage: mk-image.py PATH [--size-mib 4096] [--runs 1024] [--seed 1]
Deterministic for a given seed. Prints the data offsets count and size.
"""
import argparse
import os
import random

MIB = 1 << 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--size-mib", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.runs > a.size_mib:
        ap.error("more runs than MiB slots")
    rng = random.Random(a.seed)
    slots = sorted(rng.sample(range(a.size_mib), a.runs))
    with open(a.path, "wb") as f:
        f.truncate(a.size_mib * MIB)
        for s in slots:
            f.seek(s * MIB)
            f.write(rng.randbytes(MIB))
        f.flush()
        os.fsync(f.fileno())
    extents = 0
    prev = None
    for s in slots:
        if prev is None or s != prev + 1:
            extents += 1
        prev = s
    print(f"{a.path}: {a.size_mib} MiB, {a.runs} MiB data in {extents} extents, seed {a.seed}")


if __name__ == "__main__":
    main()
