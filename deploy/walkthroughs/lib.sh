# Shared by the two-host walkthroughs: two "hosts" A and B as network
# namespaces joined by a veth pair, A at 198.18.0.1 and B at 198.18.0.2
# (a /30 of the benchmarking range, inside our own namespaces only), and
# helpers to run the steps on either. Needs root and iproute2. Everything
# is torn down on exit: the daemons by pid, the namespaces (and with them
# the veth pair) by name.
#
# A walkthrough sources this file, calls two_hosts, then runs its steps
# with on_a / on_b; `step` prints the headings the README follows.

set -euo pipefail

NBDFERRY=${NBDFERRY:-nbdferry}
HOST_A=198.18.0.1
HOST_B=198.18.0.2
DEADLINE=${DEADLINE:-30}

NS_A="nbdferry-a-$$"
NS_B="nbdferry-b-$$"
DAEMON_PIDS=()

step() {
    printf '\n== %s\n' "$*"
}

fail() {
    echo "walkthrough failed: $*" >&2
    exit 1
}

# in_ns NS CMD...: CMD on that host; `nbdferry` is the binary under test.
in_ns() {
    local ns=$1
    shift
    if [ "$1" = nbdferry ]; then
        shift
        set -- "$NBDFERRY" "$@"
    fi
    ip netns exec "$ns" "$@"
}

on_a() {
    in_ns "$NS_A" "$@"
}

on_b() {
    in_ns "$NS_B" "$@"
}

teardown() {
    local pid
    for pid in "${DAEMON_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${DAEMON_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    if [ -n "${WORK_OWNED:-}" ]; then
        rm -rf "$WORK"
    fi
}

# two_hosts [WORKDIR]: the namespaces, the link, and $A and $B, the two
# hosts' directories under WORKDIR (a fresh temporary one by default).
two_hosts() {
    [ "$(id -u)" = 0 ] || fail "needs root to create network namespaces"
    command -v ip >/dev/null || fail "needs ip (iproute2)"
    command -v "$NBDFERRY" >/dev/null || fail "no nbdferry binary: set NBDFERRY=PATH"
    if [ -n "${1:-}" ]; then
        WORK=$1
        mkdir -p "$WORK"
    else
        WORK=$(mktemp -d -t nbdferry-walkthrough.XXXXXX)
        WORK_OWNED=1
    fi
    A=$WORK/host-a
    B=$WORK/host-b
    mkdir -p "$A" "$B"
    trap teardown EXIT
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "nbdfa$$" type veth peer name "nbdfb$$"
    ip link set "nbdfa$$" netns "$NS_A"
    ip link set "nbdfb$$" netns "$NS_B"
    ip -n "$NS_A" addr add "$HOST_A/30" dev "nbdfa$$"
    ip -n "$NS_B" addr add "$HOST_B/30" dev "nbdfb$$"
    local ns
    for ns in "$NS_A" "$NS_B"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_A" link set "nbdfa$$" up
    ip -n "$NS_B" link set "nbdfb$$" up
}

# start_daemon A|B LOG ARGS...: `nbdferry ARGS` in the background on host
# A or B, its stderr in LOG; the pid is kept for the teardown.
start_daemon() {
    local ns log=$2
    case $1 in
        A) ns=$NS_A ;;
        B) ns=$NS_B ;;
        *) fail "start_daemon: host A or B, not $1" ;;
    esac
    shift 2
    # A simple command, so that $! is the daemon itself (ip netns exec
    # execs it), not a subshell a signal would not reach it through.
    ip netns exec "$ns" "$NBDFERRY" "$@" >/dev/null 2>"$log" &
    DAEMON_PIDS+=("$!")
}

# wait_ready ON ARGS...: polls `nbdferry health --ready ARGS` on host ON
# until the daemon is ready, for at most $DEADLINE seconds.
wait_ready() {
    local on=$1
    shift
    local end=$((SECONDS + DEADLINE))
    until "$on" nbdferry health --ready "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || fail "daemon not ready after ${DEADLINE}s"
        sleep 0.2
    done
}

# stop_daemons: SIGTERM every daemon started here and check each exits 0.
stop_daemons() {
    local pid
    for pid in "${DAEMON_PIDS[@]}"; do
        kill -TERM "$pid"
        wait "$pid" || fail "daemon $pid exited with status $?"
    done
    DAEMON_PIDS=()
}

# must_fail CMD...: the step is a refusal; it must not succeed.
must_fail() {
    if "$@" 2>"$WORK/refusal.txt"; then
        fail "expected a refusal: $*"
    fi
    echo "refused, as it should be: $(cat "$WORK/refusal.txt")"
}
