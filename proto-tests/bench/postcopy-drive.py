#!/usr/bin/python3
"""The timed steps of bench-postcopy.sh that a shell cannot do well; each
prints one JSON object. Run it with /usr/bin/python3 (the `reads`
subcommand needs libnbd's module, python3-libnbd).

  postcopy-drive.py ferry-status --admin SOCK
      the daemon's GET /v1/disks/disk/hydration (admin socket, HTTP), once.
  postcopy-drive.py qemu-stream --qmp SOCK [--device ov] [--timeout S]
      block-stream of DEVICE (whole backing chain into it) over QMP;
      t_start just before the command, t_end = BLOCK_JOB_COMPLETED's stamp.
  postcopy-drive.py reads URI --image IMG --n N --seed S
                    [--region OFF LEN [--prefetch]]
      QD1 4 KiB reads over one connection, each timed alone, each compared
      with the image (a mismatch counts in "bad"). Without --region: N
      distinct 64 KiB blocks of the image's data (SEEK_DATA, none in the
      first 4 MiB), one read at a random 4 KiB offset in each, so every read
      is the first of its block; one untimed read of another data block
      first (connections the server opens at the first read). With
      --region: N random 4 KiB reads inside it, after (--prefetch) reading
      it whole in 1 MiB requests, untimed but checked.
      Prints n, med_us, p99_us, mean_us, max_us, bad (and prefetch_s).

QMP comes from mirror-drive.py (its Qmp class and stamp), loaded by path.
"""
import argparse
import http.client
import importlib.util
import json
import os
import random
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20
BLOCK = 64 * 1024
READ = 4096


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(self.unix_path)
        self.sock = s


def hydration(admin, disk="disk"):
    c = UnixHTTP(admin)
    try:
        c.request("GET", f"/v1/disks/{disk}/hydration")
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"hydration status: HTTP {r.status}: {body!r}")
        return json.loads(body)
    finally:
        c.close()


def qmp_module():
    spec = importlib.util.spec_from_file_location("mirror_drive", os.path.join(HERE, "mirror-drive.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def qemu_stream(a):
    md = qmp_module()
    for _ in range(200):
        if os.path.exists(a.qmp):
            break
        time.sleep(0.05)
    q = md.Qmp(a.qmp)
    t_start = time.time()
    q.cmd("block-stream", **{"job-id": "s1", "device": a.device})
    ev = q.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"},
                      t_start + a.timeout)
    t_seen = time.time()
    if ev is None or ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
        raise SystemExit(f"block-stream did not complete: {ev}")
    return {"t_start": t_start, "t_end": md.stamp(ev), "t_seen": t_seen,
            "stream_s": md.stamp(ev) - t_start, "bytes": ev["data"].get("offset")}


def data_blocks(fd, size, skip):
    """64 KiB-aligned blocks lying wholly in data extents, from SKIP on."""
    out = []
    pos = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        b = -(-d // BLOCK) * BLOCK
        while b + BLOCK <= h:
            if b >= skip:
                out.append(b)
            b += BLOCK
        pos = h
    return out


def reads(a):
    import nbd

    rng = random.Random(a.seed)
    fd = os.open(a.image, os.O_RDONLY)
    size = os.fstat(fd).st_size
    h = nbd.NBD()
    h.connect_uri(a.uri)
    bad = 0
    out = {}

    def check(off, got):
        nonlocal bad
        if got != os.pread(fd, len(got), off):
            bad += 1
            if bad <= 5:
                print(f"MISMATCH at {off} (+{len(got)}) from {a.uri}", file=sys.stderr)

    if a.region:
        start, length = a.region
        if a.prefetch:
            t0 = time.perf_counter()
            for off in range(start, start + length, MIB):
                check(off, h.pread(min(MIB, start + length - off), off))
            out["prefetch_s"] = time.perf_counter() - t0
        offs = [start + rng.randrange(length // READ) * READ for _ in range(a.n)]
    else:
        blocks = data_blocks(fd, size, 4 * MIB)
        if len(blocks) < a.n + 1:
            raise SystemExit(f"only {len(blocks)} data blocks for {a.n} first reads")
        picked = rng.sample(blocks, a.n + 1)
        offs = [b + rng.randrange(BLOCK // READ) * READ for b in picked]
        check(offs[0], h.pread(READ, offs[0]))  # untimed: connections, first fetch
        offs = offs[1:]
    lat = []
    for off in offs:
        t0 = time.perf_counter_ns()
        buf = h.pread(READ, off)
        lat.append((time.perf_counter_ns() - t0) / 1000)
        check(off, buf)
    h.shutdown()
    lat.sort()
    out.update({"n": len(lat), "med_us": statistics.median(lat),
                "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                "mean_us": statistics.fmean(lat), "max_us": lat[-1], "bad": bad})
    return out


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ferry-status")
    p.add_argument("--admin", required=True)
    p = sub.add_parser("qemu-stream")
    p.add_argument("--qmp", required=True)
    p.add_argument("--device", default="ov")
    p.add_argument("--timeout", type=float, default=600)
    p = sub.add_parser("reads")
    p.add_argument("uri")
    p.add_argument("--image", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--region", type=int, nargs=2, metavar=("OFF", "LEN"))
    p.add_argument("--prefetch", action="store_true")
    a = ap.parse_args()
    if a.cmd == "ferry-status":
        r = hydration(a.admin)
    elif a.cmd == "qemu-stream":
        r = qemu_stream(a)
    else:
        r = reads(a)
    json.dump(r, sys.stdout)
    print()


if __name__ == "__main__":
    main()
