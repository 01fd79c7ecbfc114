#!/bin/sh
# own-netns.sh COMMAND [ARG...]: run COMMAND in a network namespace of its
# own, with only a loopback, as a pod has. make bench and make soak use it.
#
# Why: a machine where Docker ever ran keeps the kernel's connection
# tracking on for its own network namespace, loopback included; each
# connection then holds a table entry for 120 s after it ends. The bench
# opens ~10,000 connections a second in its connection-per-request rounds,
# fills the table (262,144 entries here) in under half a minute, and the
# kernel drops new connections' SYNs ("nf_conntrack: table full, dropping
# packet"): 1 s stalls, a throughput round at 1.7 req/s, a server "not
# answering". In a namespace of its own nothing is tracked, and neither the
# ports, the TIME_WAIT sockets nor the table of other programs on the machine
# (or theirs of ours) get in the way.
#
# Needs root, or user namespaces (then as root mapped to our uid). Without
# either it runs COMMAND here and says so. HOTSWAP_NETNS tells COMMAND
# where it runs: "own" or "host".
set -eu
if [ "${HOTSWAP_NETNS:-}" = own ]; then
    exec "$@"
fi
inner='ip link set lo up && HOTSWAP_NETNS=own exec "$@"'
if unshare --net true 2>/dev/null; then
    exec unshare --net -- sh -c "$inner" sh "$@"
fi
if unshare --user --map-root-user --net true 2>/dev/null; then
    exec unshare --user --map-root-user --net -- sh -c "$inner" sh "$@"
fi
echo "own-netns: no network namespace of our own (needs root or user namespaces);" \
     "running in this one, where connection tracking or other programs' load" \
     "may drop connections" >&2
HOTSWAP_NETNS=host exec "$@"
