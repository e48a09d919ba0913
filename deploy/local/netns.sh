#!/bin/bash
# A pretend cluster on one Linux machine (root): N "hosts", each a network namespace with its
# own stack and one interface `scout0` (SUBNET.1 .. SUBNET.N), joined by a bridge that lives in a
# further namespace PREFIX-sw (address SUBNET.254: the monitoring / login "host"). Nothing is
# added to the machine's own network namespace, so test traffic never leaves these namespaces.
#
#   netns.sh up PREFIX SUBNET N    e.g. netns.sh up scout 10.77.0 3  ->  scout-h0 10.77.0.1 ...
#   netns.sh down PREFIX N         removes them (their veth pairs and the bridge go with them)
#
# Run a command on host i with `ip netns exec PREFIX-h<i> CMD`; deploy/local/srun does that for
# each node of an srun step (see docs/DEPLOY.md, "Multi-node rehearsal").
set -euo pipefail

up() {
  local prefix="$1" subnet="$2" n="$3" sw="$1-sw" i ns
  ip netns add "$sw"
  ip -n "$sw" link set lo up
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" addr add "$subnet.254/24" dev br0
  ip -n "$sw" link set br0 up
  for (( i = 0; i < n; i++ )); do
    ns="$prefix-h$i"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # the pair is made inside the host's namespace; its peer end moves to the switch namespace
    ip -n "$ns" link add scout0 type veth peer name "p$i" netns "$sw"
    ip -n "$ns" addr add "$subnet.$(( i + 1 ))/24" dev scout0
    ip -n "$ns" link set scout0 up
    ip -n "$sw" link set "p$i" master br0 up
  done
}

down() {
  local prefix="$1" n="$2" i
  for (( i = 0; i < n; i++ )); do ip netns del "$prefix-h$i" 2>/dev/null || true; done
  ip netns del "$prefix-sw" 2>/dev/null || true
}

case "${1:-}" in
  up) up "${2:?prefix}" "${3:?subnet, e.g. 10.77.0}" "${4:?number of hosts}" ;;
  down) down "${2:?prefix}" "${3:?number of hosts}" ;;
  *) echo "usage: netns.sh up PREFIX SUBNET N | down PREFIX N" >&2; exit 2 ;;
esac
