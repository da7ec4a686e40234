#!/usr/bin/env bash
# Walkthrough: mutual TLS between two hosts, for NBD and for the remote
# admin API. Host A (198.18.0.1) serves a disk; host B (198.18.0.2) reads
# it, copies it and snapshots it from afar, each time with its own
# certificate. deploy/README.md follows these steps; the interop suite
# runs this script (proto-tests/interop/deploy.rs), so the guide cannot
# rot. On real hosts, run each "on A" / "on B" command on that host.
#
# Usage (root): NBDFERRY=/path/to/nbdferry deploy/walkthroughs/tls.sh [WORKDIR]

. "$(dirname "$0")/lib.sh"
two_hosts "${1:-}"

step "1. On A: a CA, A's server certificate, and an identity for B"
on_a nbdferry certs init "$A/pki" --server-name "$HOST_A" --client-name host-b
# B gets the CA certificate and its own key pair, nothing else.
mkdir -p "$B/pki"
cp "$A/pki/ca-cert.pem" "$A/pki/client-cert.pem" "$A/pki/client-key.pem" "$B/pki/"

step "2. On A: a disk and the configuration"
head -c 4M /dev/urandom >"$A/disk1.raw"
truncate -s 64M "$A/disk1.raw"
cat >"$A/nbdferry.toml" <<CONF
listen = ["$HOST_A:10809"]
tls = "require"
tls-creds = "$A/pki"
admin-listen = "$HOST_A:10810"

[[admin.grant]]
client = "host-b"
role = "operator"
disks = ["disk1"]

[[export]]
name = "disk1"
path = "$A/disk1.raw"
allow-clients = ["host-b"]
CONF

step "3. On A: start the daemon and wait until it is ready"
start_daemon A "$A/daemon.log" serve --state-dir "$A/state" --config "$A/nbdferry.toml"
wait_ready on_a --admin "$A/state/admin.sock"

step "4. On B: the export, over TLS with B's certificate"
on_b nbdferry info "nbds://$HOST_A/disk1?tls-certificates=$B/pki"

step "5. On B: copy the disk and compare"
on_b nbdferry copy "nbds://$HOST_A/disk1?tls-certificates=$B/pki" "$B/disk1.raw"
cmp "$A/disk1.raw" "$B/disk1.raw" || fail "the copy differs from the disk"
echo "copy identical"

step "6. On B: no TLS, no disk"
must_fail on_b nbdferry info "nbd://$HOST_A/disk1"

step "7. On B: snapshot the disk through A's admin API"
admin=(--admin "https://$HOST_A:10810" --tls-creds "$B/pki")
on_b nbdferry health --ready "${admin[@]}"
on_b nbdferry snapshot create disk1 s1 "${admin[@]}"
on_b nbdferry snapshot list disk1 "${admin[@]}"
on_b nbdferry copy "nbds://$HOST_A/disk1@s1?tls-certificates=$B/pki" "$B/s1.raw"
cmp "$A/disk1.raw" "$B/s1.raw" || fail "the snapshot differs from the disk"

step "8. On B: reverting takes the admin role, which B lacks"
must_fail on_b nbdferry snapshot revert disk1 s1 "${admin[@]}"

step "9. On A: stop the daemon (SIGTERM drains, exits 0)"
stop_daemons

# Migration (post-copy, pre-copy) and the backup server get their own
# scripts beside this one, built on lib.sh's two_hosts.
echo
echo "walkthrough passed: tls"
