#!/usr/bin/env bash
# Walkthrough: move a live disk from host A (198.18.0.1) to host B
# (198.18.0.2) with a pre-copy mirror over mutual TLS, while a client
# keeps writing it; then A's copy is read-only and B serves the disk.
# deploy/README.md follows these steps; the interop suite runs this
# script (proto-tests/interop/deploy.rs), so the guide cannot rot.
#
# Usage (root): NBDFERRY=/path/to/nbdferry deploy/walkthroughs/migrate.sh [WORKDIR]

. "$(dirname "$0")/lib.sh"
two_hosts "${1:-}"

step "1. On A: one CA, a server certificate for both hosts, an identity each"
on_a nbdferry certs init "$A/pki" --server-name "$HOST_A" --server-name "$HOST_B" \
    --client-name host-a
on_a nbdferry certs client "$A/pki" host-b "$A/pki-b"
mkdir -p "$B/pki"
cp "$A/pki/ca-cert.pem" "$A/pki/server-cert.pem" "$A/pki/server-key.pem" \
    "$A/pki-b/client-cert.pem" "$A/pki-b/client-key.pem" "$B/pki/"

step "2. On A: the disk, served; on B: an empty disk of the same size"
head -c 8M /dev/urandom >"$A/disk1.raw"
truncate -s 64M "$A/disk1.raw"
truncate -s 64M "$B/disk1.raw"
start_daemon A "$A/daemon.log" serve --listen "$HOST_A:10809" --tls-creds "$A/pki" \
    --state-dir "$A/state" --name disk1 "$A/disk1.raw"
start_daemon B "$B/daemon.log" serve --listen "$HOST_B:10809" --tls-creds "$B/pki" \
    --allow-client host-a --state-dir "$B/state" --name disk1 "$B/disk1.raw"
wait_ready on_a --admin "$A/state/admin.sock"
wait_ready on_b --admin "$B/state/admin.sock"

step "3. On A: start the mirror; a client rewrites the disk meanwhile"
admin_a=(--admin "$A/state/admin.sock")
src="nbds://$HOST_A/disk1?tls-certificates=$A/pki"
on_a nbdferry mirror start disk1 --to "nbds://$HOST_B/disk1?tls-certificates=$A/pki" "${admin_a[@]}"
head -c 64M /dev/urandom >"$A/new.raw"
on_a nbdferry copy "$A/new.raw" "$src"

step "4. On A: wait until the mirror is ready, then hand over"
deadline=$((SECONDS + 120))
until on_a nbdferry mirror status disk1 --json "${admin_a[@]}" | grep -q '"ready": true'; do
    [ "$SECONDS" -lt "$deadline" ] || fail "the mirror did not get ready in 120 s"
    sleep 0.2
done
on_a nbdferry mirror complete disk1 --json "${admin_a[@]}"

step "5. Both hosts hold the new content; A refuses writes now"
cmp "$A/new.raw" "$B/disk1.raw" || fail "B's disk differs from what the client wrote"
echo "B holds the disk"
must_fail on_a nbdferry copy "$A/new.raw" "$src"

step "6. Stop both daemons"
stop_daemons

echo
echo "walkthrough passed: migrate"
