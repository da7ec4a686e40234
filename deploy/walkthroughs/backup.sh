#!/usr/bin/env bash
# Walkthrough: host B (198.18.0.2) is the backup server of host A
# (198.18.0.1). Over mutual TLS it takes a full and then an incremental
# point of A's live disk through A's admin API, and restores the newest
# point. deploy/README.md follows these steps; the interop suite runs this
# script (proto-tests/interop/deploy.rs), so the guide cannot rot.
#
# Usage (root): NBDFERRY=/path/to/nbdferry deploy/walkthroughs/backup.sh [WORKDIR]

. "$(dirname "$0")/lib.sh"
two_hosts "${1:-}"

step "1. On A: a CA, A's server certificate, and an identity for B"
on_a nbdferry certs init "$A/pki" --server-name "$HOST_A" --client-name host-b
mkdir -p "$B/pki"
cp "$A/pki/ca-cert.pem" "$A/pki/client-cert.pem" "$A/pki/client-key.pem" "$B/pki/"

step "2. On A: serve the disk, with the admin API for B (operator on disk1)"
head -c 8M /dev/urandom >"$A/disk1.raw"
truncate -s 64M "$A/disk1.raw"
start_daemon A "$A/daemon.log" serve --listen "$HOST_A:10809" --tls-creds "$A/pki" \
    --admin-listen "$HOST_A:10810" --admin-grant host-b=operator:disk1 \
    --state-dir "$A/state" --name disk1 "$A/disk1.raw"
wait_ready on_a --admin "$A/state/admin.sock"

step "3. On B: the first point is full"
run=(backup run --admin "https://$HOST_A:10810" --tls-creds "$B/pki" --disk disk1
    --repo "$B/repo" --json)
on_b nbdferry "${run[@]}" | tee "$B/run1.json"
grep -q '"kind": *"full"' "$B/run1.json" || fail "the first point is not full"

step "4. On A: a client writes 1 MiB; on B: the next point reads only that"
# Through NBD, as any client does (a write behind the daemon's back, to
# the file, would not be tracked). nbdsh is Debian's python3 -m nbd.
URI="nbds://$HOST_A/disk1?tls-certificates=$A/pki" on_a /usr/bin/python3 -m nbd -c '
import os
h.set_uri_allow_local_file(True)
h.connect_uri(os.environ["URI"])
h.pwrite(os.urandom(1 << 20), 20 << 20)
h.flush()'
on_b nbdferry "${run[@]}" | tee "$B/run2.json"
grep -q '"kind": *"incremental"' "$B/run2.json" || fail "the second point is not incremental"
read2=$(grep -o '"bytes_read": *[0-9]*' "$B/run2.json" | grep -o '[0-9]*$')
[ "$read2" -le $((2 << 20)) ] || fail "the incremental read $read2 bytes for 1 MiB written"
echo "the incremental read $read2 bytes"

step "5. On B: list the points and restore the newest"
on_b nbdferry backup list --repo "$B/repo"
on_b nbdferry restore --repo "$B/repo" disk1 "$B/restored.raw"
cmp "$A/disk1.raw" "$B/restored.raw" || fail "the restore differs from the disk"
echo "restore identical"

step "6. On A: one checkpoint is left for the next incremental"
on_a nbdferry checkpoint list disk1 --admin "$A/state/admin.sock"

step "7. Stop the daemon"
stop_daemons

echo
echo "walkthrough passed: backup"
