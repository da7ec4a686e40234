#!/usr/bin/env python3
"""Drives one mirror job of bench-mirror.sh, nbdferry's or qemu's, through
the same steps, and prints what it timed as one JSON object.

  mirror-drive.py nbdferry --bin BIN --admin SOCK --to URI [common options]
  mirror-drive.py qemu --qmp SOCK --to-port PORT [--to-host 127.0.0.1] [--to-export disk] [common]

common: --mode background|active   (qemu: active = copy-mode write-blocking)
        --rate BYTES/s             copier limit (nbdferry --rate, qemu speed)
        --ready-timeout S          give up waiting for ready after S seconds
        --switch                   not ready by then: go active and wait again
        --hold S                   stay ready S seconds before completing
        --ready-file PATH          touched when ready (the bench starts its
                                   latency window then)

Steps: start the job (t_start), wait for ready (nbdferry: `mirror status
--json` polled every 50 ms says "ready": true; qemu: the BLOCK_JOB_READY
event, stamped by qemu), hold, then complete:
  nbdferry: `mirror complete --json` (after=read-only); its downtime_ms is
            the time the daemon held client writes; the command's own wall
            time is reported too;
  qemu:     `job-complete`, then the BLOCK_JOB_COMPLETED event. That
            interval is NOT a write freeze: qemu keeps taking guest writes
            while it converges and only drains the source for the switch
            at the end. The writer's longest write in the interval is the
            freeze the guest saw (computed by mirror-check.py from its log).
Not ready at all: the job is cancelled and "ready" is false.
All stamps are wall-clock seconds (time.time(), qemu's event stamps).
Standard library only.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

POLL = 0.05


class Nbdferry:
    def __init__(self, a):
        self.bin, self.admin, self.to = a.bin, a.admin, a.to
        self.last = {}
        self.bulk_end = None

    def cli(self, *args):
        out = subprocess.run([self.bin, "mirror", *args, "--admin", self.admin],
                             check=True, capture_output=True, text=True).stdout
        return out

    def start(self, mode, rate):
        args = ["start", "disk", "--to", self.to, "--mode", mode]
        if rate:
            args += ["--rate", str(rate)]
        self.cli(*args)

    def status(self):
        self.last = json.loads(self.cli("status", "disk", "--json"))
        if self.bulk_end is None and self.last.get("phase") != "bulk":
            self.bulk_end = time.time()
        return self.last

    def wait_ready(self, deadline):
        while time.time() < deadline:
            if self.status().get("ready"):
                return time.time()
            time.sleep(POLL)
        return None

    def left(self):
        return self.status().get("dirty_bytes")

    def go_active(self):
        self.cli("set", "disk", "--mode", "active")

    def complete(self):
        t0 = time.time()
        out = json.loads(self.cli("complete", "disk", "--json"))
        t1 = time.time()
        return {"t_complete": t0, "t_completed": t1,
                "downtime_ms": out["downtime_ms"], "bytes_sent": out["bytes_sent"],
                "passes": out["passes"]}

    def cancel(self):
        self.cli("cancel", "disk")

    def extra(self):
        return {"t_bulk_end": self.bulk_end, "last_status": self.last}


class Qmp:
    """QMP over a Unix socket: one JSON object per line; events that
    arrive while waiting for a reply are kept for wait_event."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.buf = b""
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self, deadline=None):
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.time()
                if left <= 0:
                    return None
                self.s.settimeout(left)
            else:
                self.s.settimeout(None)
            try:
                chunk = self.s.recv(65536)
            except (TimeoutError, socket.timeout):
                return None
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.settimeout(None)
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
            elif "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            else:
                return r["return"]

    def wait_event(self, names, deadline):
        """The first kept or new event named in NAMES, or None."""
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names:
                    return self.events.pop(i)
            r = self._read(deadline)
            if r is None:
                return None
            if "event" in r:
                self.events.append(r)


def stamp(ev):
    return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6


class Qemu:
    def __init__(self, a):
        self.q = Qmp(a.qmp)
        self.q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
                   server={"type": "inet", "host": a.to_host, "port": str(a.to_port)},
                   export=a.to_export)
        self.progress = None

    def start(self, mode, rate):
        args = {"job-id": "m1", "device": "src", "target": "tgt", "sync": "full",
                "copy-mode": "write-blocking" if mode == "active" else "background"}
        if rate:
            args["speed"] = rate
        self.q.cmd("blockdev-mirror", **args)

    def wait_ready(self, deadline):
        ev = self.q.wait_event({"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
                                "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"}, deadline)
        if ev is None:
            return None
        if ev["event"] != "BLOCK_JOB_READY":
            raise RuntimeError(f"job ended before ready: {ev}")
        return stamp(ev)

    def left(self):
        for j in self.jobs():
            if j["device"] == "m1":
                return j["len"] - j["offset"]
        return None

    def go_active(self):
        self.q.cmd("block-job-change", id="m1", type="mirror",
                   **{"copy-mode": "write-blocking"})

    def jobs(self):
        return self.q.cmd("query-block-jobs")

    def complete(self):
        for j in self.jobs():
            if j["device"] == "m1":
                self.progress = j
        t0 = time.time()
        self.q.cmd("job-complete", id="m1")
        ev = self.q.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                                "BLOCK_JOB_ERROR"}, time.time() + 120)
        t1 = time.time()
        if ev is None or ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
            raise RuntimeError(f"job-complete did not complete: {ev}")
        return {"t_complete": t0, "t_completed": stamp(ev), "t_event_seen": t1,
                "bytes_sent": ev["data"].get("offset"),
                "downtime_ms": None}

    def cancel(self):
        self.q.cmd("job-cancel", id="m1")
        self.q.wait_event({"BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"}, time.time() + 60)

    def extra(self):
        return {"progress_at_complete": self.progress}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tool", choices=["nbdferry", "qemu"])
    ap.add_argument("--bin")
    ap.add_argument("--admin")
    ap.add_argument("--to")
    ap.add_argument("--qmp")
    ap.add_argument("--to-port", type=int)
    ap.add_argument("--to-host", default="127.0.0.1")
    ap.add_argument("--to-export", default="disk")
    ap.add_argument("--mode", choices=["background", "active"], default="background")
    ap.add_argument("--rate", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=120)
    ap.add_argument("--switch", action="store_true")
    ap.add_argument("--hold", type=float, default=0)
    ap.add_argument("--ready-file")
    a = ap.parse_args()
    job = Nbdferry(a) if a.tool == "nbdferry" else Qemu(a)
    r = {"tool": a.tool, "mode": a.mode, "rate": a.rate}
    r["t_start"] = time.time()
    job.start(a.mode, a.rate)
    r["t_ready"] = job.wait_ready(r["t_start"] + a.ready_timeout)
    r["t_switch"] = None
    if r["t_ready"] is None and a.switch:
        r["left_at_switch"] = job.left()
        r["t_switch"] = time.time()
        job.go_active()
        r["t_ready"] = job.wait_ready(r["t_switch"] + 120)
    r["ready"] = r["t_ready"] is not None
    if r["ready"]:
        if a.ready_file:
            open(a.ready_file, "w").close()
        if a.hold:
            time.sleep(a.hold)
        if a.tool == "nbdferry":
            # Whether it is still ready now: complete does not wait for it.
            r["ready_at_complete"] = job.status().get("ready")
        r.update(job.complete())
    else:
        r["t_cancel"] = time.time()
        job.cancel()
    r.update(job.extra())
    json.dump(r, sys.stdout)
    print()


if __name__ == "__main__":
    main()
