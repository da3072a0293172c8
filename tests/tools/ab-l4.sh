#!/bin/bash
# The L4 path (zt-ebpf) of the hold world (`mesh-bench --hold > /tmp/hold.log`): wrk with 1
# and 16 connections: req/s, p50, p99 and each agent's CPU per request (µs).
#   ab-l4.sh LABEL ROUNDS SECONDS
label=$1; rounds=$2; dur=$3
line=$(grep '^zt-ebpf' /tmp/hold.log)
ns=$(echo "$line" | sed -E 's/.*client netns ([^ ]+).*/\1/')
url=$(echo "$line" | grep -oE 'http://[^ ]+')
c=$(echo "$line" | grep -oE 'Client=[0-9]+' | cut -d= -f2); s=$(echo "$line" | grep -oE 'Server=[0-9]+' | cut -d= -f2)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
tck=$(getconf CLK_TCK)
ip netns exec $ns wrk -t1 -c16 -d2s $url > /dev/null
for r in $(seq $rounds); do for cc in 1 16; do
  t=$([ $cc = 1 ] && echo 1 || echo 2)
  a1=$(cpu $c); a2=$(cpu $s)
  out=$(ip netns exec $ns wrk -t$t -c$cc -d${dur}s --latency $url)
  b1=$(cpu $c); b2=$(cpu $s)
  reqs=$(echo "$out" | awk '/requests in/{print $1}')
  echo "$label r$r c$cc rps=$(echo "$out" | awk '/Requests\/sec/{print $2}') p50=$(echo "$out" | awk '/ 50%/{print $2}') p99=$(echo "$out" | awk '/ 99%/{print $2}') cpu_us/req n1=$(echo "scale=1;($b1-$a1)*1000000/$tck/$reqs"|bc) n2=$(echo "scale=1;($b2-$a2)*1000000/$tck/$reqs"|bc)"
done; done
