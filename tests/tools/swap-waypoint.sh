#!/bin/bash
# Restarts a running waypoint process PID as NEWBIN with the same arguments, environment
# (less TOKIO_* and WAYPOINT_THREADING, which A/B runs set per build), working directory and network namespace; extra VAR=VAL set for the new one.
# Prints the new pid. For A/B runs in the world `mesh-bench --hold` keeps up.
#   swap-waypoint.sh PID NEWBIN [VAR=VAL...]
set -e
pid=$1; bin=$2; shift 2
ns=$(ip netns identify $pid)
mapfile -d '' args < /proc/$pid/cmdline
mapfile -d "" envs0 < /proc/$pid/environ; envs=(); for e in "${envs0[@]}"; do [[ $e == TOKIO_* || $e == WAYPOINT_THREADING=* ]] || envs+=("$e"); done
cwd=$(readlink /proc/$pid/cwd)
kill $pid
for i in $(seq 50); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
kill -9 $pid 2>/dev/null || true
cd $cwd
setsid ip netns exec $ns env -i "${envs[@]}" "$@" $bin "${args[@]:1}" >> /tmp/wp-swap.log 2>&1 < /dev/null &
sleep 1.5
pgrep -n -f "^$bin " 
