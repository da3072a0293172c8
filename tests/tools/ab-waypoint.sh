#!/bin/bash
# A/B of waypoint builds in the hold world (`mesh-bench --hold > /tmp/hold.log`): for each
# round and build, swaps the waypoint in, then wrk with 1 and 16 connections through the
# waypoint path: req/s, the waypoint's CPU per request (µs) and p50. EXTRA_<i>="VAR=VAL"
# adds an environment variable to build i (1-based).
#   ab-waypoint.sh ROUNDS SECONDS BIN_A BIN_B...
# The swapped-in waypoint is not the harness's: after stopping `mesh-bench --hold`,
# `kill "$(cat /tmp/wp.pid)"`.
rounds=$1; dur=$2; shift 2
line=$(grep '^waypoint' /tmp/hold.log)
ns=$(echo "$line" | sed -E 's/.*client netns ([^ ]+).*/\1/')
url=$(echo "$line" | grep -oE 'http://[^ ]+')
# The waypoint running now: the last one swapped in (/tmp/wp.pid), else the world's own.
wpid=$(cat /tmp/wp.pid 2>/dev/null)
kill -0 "$wpid" 2>/dev/null || wpid=$(echo "$line" | grep -oE 'Waypoint=[0-9]+' | cut -d= -f2)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
tck=$(getconf CLK_TCK)
for r in $(seq $rounds); do
  i=0
  for bin in "$@"; do
    i=$((i+1)); ev=EXTRA_$i
    wpid=$("$(dirname "$0")"/swap-waypoint.sh $wpid $bin ${!ev}); echo $wpid > /tmp/wp.pid
    ip netns exec $ns wrk -t1 -c16 -d2s $url > /dev/null
    for c in 1 16; do
      t=$([ $c = 1 ] && echo 1 || echo 2)
      a=$(cpu $wpid)
      out=$(ip netns exec $ns wrk -t$t -c$c -d${dur}s --latency $url)
      b=$(cpu $wpid)
      rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
      reqs=$(echo "$out" | awk '/requests in/{print $1}')
      p50=$(echo "$out" | awk '/ 50%/{print $2}')
      us=$(echo "scale=1; ($b-$a)*1000000/$tck/$reqs" | bc)
      echo "round $r bin$i $(basename $bin) ${!ev} c$c rps=$rps cpu_us/req=$us p50=$p50"
    done
  done
done
