#!/usr/bin/env bash
# DNS throughput of meshd's clusterset.local responder beside Knot DNS serving the same records
# as a static zone, in one run, on one machine: dnsperf (UDP) against each, alternating.
#
# usage: bench/dns-qps.sh [--runs N] [--seconds S] [--services N] [--modes "pinned free insns"]
#                         [--smoke]
#   --runs N       timed runs per server and mode (default 3), alternating meshd / knot
#   --seconds S    length of each dnsperf run (default 10)
#   --services N   exported services (default 1000; one in ten headless, three endpoints each)
#   --modes        pinned: each server alone on CPU 0 (taskset), knot with one UDP worker, dnsperf
#                    on CPU 1. The headline: one core each, as meshd answers DNS on its
#                    single-threaded control-plane runtime
#                  free: nothing pinned, knot with its default workers (one per CPU)
#                  insns: user-space instructions per query under callgrind, each server sent one
#                    pass of the query file at 3,000 QPS. A count that hardly depends on what else
#                    the machine runs (QPS on a shared 2-core machine does); the kernel's part (the
#                    socket calls) is not in it
#   --smoke        one 2-second pinned run of each (CI)
# env: MESHD_BIN_DIR  directory holding a meshd binary (default: cargo build --release)
#
# Both servers run in a network namespace the script makes (meshd's TUN device, its ports and the
# loopback traffic stay there); meshd starts with flags only: no config file, no key, no peers.
# Before timing, a sample of the queries is asked of both with dig and the answers compared:
# status, answer and authority sections must be the same (knot also puts the SRV targets' A
# records in the additional section; meshd does not).
#
# Prints, per mode and server: QPS (min / median / max of the runs) and meshd's median over
# knot's; average latency under that load (100 queries outstanding); the server's CPU use (user +
# system time of its process over the run; well below 100 %, the server was waiting on dnsperf or
# on the machine); queries answered per CPU-second of the server, and that ratio (the fairer
# figure when dnsperf rather than the server is the limit); the response codes dnsperf saw and the
# average response size (medians but min / max; codes and size of the last run).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$root/scripts/deps.sh"
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

runs=3 seconds=10 services=1000 modes="pinned free insns"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --services) services=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --smoke) runs=1 seconds=2 modes=pinned; shift ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "the benchmark needs root (a network namespace, a TUN device)" >&2; exit 1; }
ensure_packages
if [ -z "${MESHD_BIN_DIR:-}" ]; then
  ensure_cargo
  (cd "$root" && cargo build --release --quiet --bin meshd)
  MESHD_BIN_DIR="${CARGO_TARGET_DIR:-$root/target}/release"
fi
meshd_bin="$MESHD_BIN_DIR/meshd"
[ -x "$meshd_bin" ] || { echo "no meshd in $MESHD_BIN_DIR (MESHD_BIN_DIR)" >&2; exit 1; }

ns=meshd-dnsbench
dev=dnsbench0
meshd_port=5300 knot_port=5301
cluster=bench
state=$(mktemp -d /tmp/meshd-dnsbench.XXXXXX)
meshd_pid="" knot_pid=""

stop() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$meshd_pid"
  stop "$knot_pid"
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$state"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A namespace left by a run that was killed: its processes first, then the namespace.
if ip netns list | grep -qw "$ns"; then
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  ip netns del "$ns"
fi
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
# dnsperf looks its server up with AI_ADDRCONFIG: without an IPv4 address besides loopback (meshd's
# TUN device has only an IPv6 link-local one) it would try ::ffff:127.0.0.1 and fail.
ip netns exec "$ns" ip link add dnsbench-a type veth peer name dnsbench-b
ip netns exec "$ns" ip addr add 192.0.2.1/24 dev dnsbench-a
ip netns exec "$ns" ip link set dnsbench-a up

# --- The records, three ways: meshd's exports file, knot's zone file, dnsperf's queries. -------
# Service i lives in namespace team-(i/100). One in ten is headless (pg/TCP/5432, three ready
# endpoints with hostnames); the others are ClusterSetIP with one IP, http/TCP/80 (every third
# also grpc/TCP/9090, every seventh an unnamed 8080 that gets no SRV) and one ready endpoint.
awk -v n="$services" -v cluster="$cluster" \
    -v exports="$state/exports.toml" -v zone="$state/clusterset.local.zone" \
    -v queries="$state/queries.txt" -v sample="$state/sample.txt" '
function ip(a, i) { return a "." int(i / 250) "." (i % 250 + 1) }
function rr(owner, type, data) { printf "%s. 5 IN %s %s\n", owner, type, data > zone }
BEGIN {
  z = "svc.clusterset.local"
  print "$ORIGIN clusterset.local." > zone
  rr("clusterset.local", "SOA", "ns.clusterset.local. hostmaster.clusterset.local. 1 5 5 60 5")
  rr("clusterset.local", "NS", "ns.clusterset.local.")
  rr("dns-version.clusterset.local", "TXT", "\"1.0.0\"")
  for (i = 0; i < n; i++) {
    team = "team-" int(i / 100)
    if (i % 10 == 9) {
      name[i] = "db-" i
      base = name[i] "." team "." z
      printf "[[services]]\nnamespace = \"%s\"\nname = \"%s\"\ntype = \"Headless\"\n", team, name[i] > exports
      printf "ports = [{ name = \"pg\", protocol = \"TCP\", port = 5432 }]\nendpoints = [\n" > exports
      for (k = 0; k < 3; k++) {
        host = name[i] "-" k
        addr = ip("10." (100 + k), i)
        printf "  { ip = \"%s\", hostname = \"%s\" },\n", addr, host > exports
        rr(base, "A", addr)
        rr(host "." cluster "." base, "A", addr)
        rr("_pg._tcp." base, "SRV", "0 33 5432 " host "." cluster "." base ".")
        rr(base, "SRV", "0 33 5432 " host "." cluster "." base ".")
      }
      printf "]\n\n" > exports
    } else {
      name[i] = "svc-" i
      base = name[i] "." team "." z
      addr = ip("10.96", i)
      ports = "{ name = \"http\", protocol = \"TCP\", port = 80 }"
      if (i % 3 == 0) ports = ports ", { name = \"grpc\", protocol = \"TCP\", port = 9090 }"
      if (i % 7 == 0) ports = ports ", { protocol = \"TCP\", port = 8080 }"
      printf "[[services]]\nnamespace = \"%s\"\nname = \"%s\"\nips = [\"%s\"]\n", team, name[i], addr > exports
      printf "ports = [%s]\nendpoints = [{ ip = \"%s\" }]\n\n", ports, ip("10.244", i) > exports
      rr(base, "A", addr)
      rr("_http._tcp." base, "SRV", "0 100 80 " base ".")
      if (i % 3 == 0) rr("_grpc._tcp." base, "SRV", "0 100 9090 " base ".")
      # SRV of the bare name: every port (the unnamed one too), equal weights.
      count = 1 + (i % 3 == 0) + (i % 7 == 0)
      weight = int(100 / count)
      rr(base, "SRV", "0 " weight " 80 " base ".")
      if (i % 3 == 0) rr(base, "SRV", "0 " weight " 9090 " base ".")
      if (i % 7 == 0) rr(base, "SRV", "0 " weight " 8080 " base ".")
    }
  }
  # The query mix: mostly A for existing names, then SRV, some NXDOMAIN and NODATA.
  srand(4242)
  for (q = 0; q < 20000; q++) {
    i = int(rand() * n); team = "team-" int(i / 100); base = name[i] "." team "." z
    r = rand(); hl = (i % 10 == 9)
    if (r < 0.45) line = base " A"
    else if (r < 0.55) line = base " SRV"
    else if (r < 0.65) line = (hl ? name[i] "-" int(rand() * 3) "." cluster "." base : base) " A"
    else if (r < 0.80) line = (hl ? "_pg._tcp." : (i % 3 == 0 && rand() < 0.5 ? "_grpc._tcp." : "_http._tcp.")) base " SRV"
    else if (r < 0.90) line = "nope-" i "." team "." z " A"
    else if (r < 0.95) line = base " AAAA"
    else if (r < 0.98) line = "_ftp._tcp." base " SRV"
    else line = "dns-version.clusterset.local TXT"
    print line > queries
    if (q % 200 == 0) print line > sample
  }
}'

# --- The servers. ------------------------------------------------------------------------------
wait_for() {  # port: until the server answers dns-version TXT (30 s: valgrind starts slowly)
  for _ in $(seq 300); do
    if ip netns exec "$ns" dig @127.0.0.1 -p "$1" dns-version.clusterset.local TXT +short +time=1 +tries=1 2>/dev/null | grep -q 1.0.0; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# Arguments: a command to run the server under (taskset ..., valgrind ...), or none. Not through
# a function's $(...): $! must be the server's PID (ip netns exec, taskset and valgrind exec).
# Response-rate limiting off, as knot runs without it: dnsperf asks each name many times a second
# from one address, which is what RRL exists to hold back.
start_meshd() {
  ip netns exec "$ns" "$@" "$meshd_bin" --interface "$dev" --cluster "$cluster" \
    --exports-file "$state/exports.toml" --dns-listen "127.0.0.1:$meshd_port" --dns-rate-limit 0 \
    --metrics-listen off --health-listen off --admin-socket "$state/admin.sock" \
    >"$state/meshd.log" 2>&1 &
  meshd_pid=$!
  wait_for "$meshd_port" || { cat "$state/meshd.log" >&2; echo "meshd did not answer on port $meshd_port" >&2; exit 1; }
}

# $1: UDP workers, or "" for knot's default (one per CPU); then a command to run it under, or none.
start_knot() {
  local workers=$1; shift
  mkdir -p "$state/knot"
  {
    echo "server:"
    echo "    listen: 127.0.0.1@$knot_port"
    echo "    rundir: $state/knot"
    [ -n "$workers" ] && printf '    udp-workers: %s\n    tcp-workers: 1\n    background-workers: 1\n' "$workers"
    echo "database:"
    echo "    storage: $state/knot"
    echo "log:"
    echo "  - target: stderr"
    echo "    any: warning"
    echo "zone:"
    echo "  - domain: clusterset.local"
    echo "    file: $state/clusterset.local.zone"
    echo "    journal-content: none"
    echo "    zonefile-sync: -1"
  } >"$state/knot.conf"
  ip netns exec "$ns" "$@" knotd -c "$state/knot.conf" >"$state/knot.log" 2>&1 &
  knot_pid=$!
  wait_for "$knot_port" || { cat "$state/knot.log" >&2; echo "knotd did not answer on port $knot_port" >&2; exit 1; }
}

# --- Same answers? -----------------------------------------------------------------------------
# One line per query: status, then the answer and authority records sorted (knot's additional
# section, glue for SRV targets, is left out: meshd sends none).
answers() {
  local port=$1 qname qtype
  while read -r qname qtype; do
    ip netns exec "$ns" dig @127.0.0.1 -p "$port" "$qname" "$qtype" +noall +comments +answer +authority +time=2 +tries=1 2>/dev/null |
      awk -v q="$qname $qtype" '
        /status:/ { match($0, /status: [A-Z]+/); status = substr($0, RSTART + 8, RLENGTH - 8) }
        /^;/ || NF == 0 { next }
        { $1 = tolower($1); recs[++n] = $0 }
        END {
          line = q " " status
          # sort the records: insertion sort, there are few
          for (i = 2; i <= n; i++) { v = recs[i]; for (j = i - 1; j >= 1 && recs[j] > v; j--) recs[j + 1] = recs[j]; recs[j + 1] = v }
          for (i = 1; i <= n; i++) line = line " | " recs[i]
          print line
        }'
  done <"$state/sample.txt"
}

check_same_answers() {
  answers "$meshd_port" >"$state/answers.meshd"
  answers "$knot_port" >"$state/answers.knot"
  if ! diff -u "$state/answers.knot" "$state/answers.meshd" >"$state/answers.diff"; then
    cat "$state/answers.diff" >&2
    echo "meshd and knot answer differently (diff above: - knot, + meshd); not benchmarking" >&2
    exit 1
  fi
  local statuses
  statuses=$(awk '{print $3}' "$state/answers.meshd" | sort | uniq -c | awk '{printf "%s %s, ", $2, $1}')
  echo "same answers from meshd and knot for $(wc -l <"$state/answers.meshd") sample queries (${statuses%, })" >&2
}

# --- Timing. -----------------------------------------------------------------------------------
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One dnsperf run against port $1, server pid $2, dnsperf pinned to $3 (or ""). Prints
# "qps avg-latency-ms lost% server-cpu% response-bytes rcodes".
measure() {
  local port=$1 pid=$2 pin=() out before after
  [ -n "$3" ] && pin=(taskset -c "$3")
  before=$(cpu_ticks "$pid")
  out=$(ip netns exec "$ns" "${pin[@]}" dnsperf -f inet -s 127.0.0.1 -p "$port" -d "$state/queries.txt" -l "$seconds" -q 100 2>&1)
  after=$(cpu_ticks "$pid")
  if ! grep -q 'Queries completed: *[1-9]' <<<"$out"; then
    echo "$out" >&2
    echo "dnsperf got no answers from port $port (output above)" >&2
    return 1
  fi
  awk -v ticks=$((after - before)) -v hz="$hz" -v secs="$seconds" '
    /Queries per second:/ { qps = $4 }
    /Queries lost:/ { lost = $4; gsub(/[()]/, "", lost) }
    /Average Latency/ { lat = $4 * 1000 }
    /Average packet size:/ { resp = $NF }
    /Response codes:/ { sub(/.*Response codes: */, ""); gsub(/ \([0-9.]+%\)/, ""); gsub(/, /, ","); gsub(/ /, "="); codes = $0 }
    END { printf "%d %.3f %s %.0f %s %s\n", qps, lat, lost, 100 * ticks / hz / secs, resp, codes }
  ' <<<"$out"
}

# User-space instructions per query of server $1 (meshd or knot) under callgrind, into
# insns_per_query[$1]: instrumentation is switched on just before dnsperf's one pass of the query
# file and off after it. Not through $(...): the server must stay known to the cleanup trap.
count_instructions() {
  local server=$1 port pid out total grind
  grind=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$state/callgrind.$server.%p")
  if [ "$server" = meshd ]; then
    start_meshd "${grind[@]}"; port=$meshd_port pid=$meshd_pid
  else
    start_knot 1 "${grind[@]}"; port=$knot_port pid=$knot_pid
  fi
  callgrind_control -i on "$pid" >/dev/null 2>&1
  out=$(ip netns exec "$ns" dnsperf -f inet -s 127.0.0.1 -p "$port" -d "$state/queries.txt" -n 1 -Q 3000 2>&1)
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  total=$(awk '/^totals:/ {print $2}' "$state/callgrind.$server.$pid.1")
  stop "$pid"
  if [ "$server" = meshd ]; then meshd_pid=""; else knot_pid=""; fi
  insns_per_query[$server]=$(awk -v total="$total" '/Queries completed:/ { if ($3 > 0) printf "%d\n", total / $3 }' <<<"$out")
}

percent() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "-" }'; }

echo "meshd: $meshd_bin; $(knotd --version 2>&1 | head -1); dnsperf $(dnsperf -h 2>&1 | awk '/Version/ {print $2}')" >&2
echo "$services services, $(wc -l <"$state/queries.txt") queries in the mix; $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)); load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

declare -A qps lat cpu perf info med eff
for mode in $modes; do
  case "$mode" in
    pinned) pin=(taskset -c 0) client_cpu=1 workers=1 ;;
    free) pin=() client_cpu="" workers="" ;;
    insns) continue ;;
    *) echo "unknown mode: $mode (pinned, free or insns)" >&2; exit 2 ;;
  esac
  start_meshd "${pin[@]}"
  start_knot "$workers" "${pin[@]}"
  check_same_answers
  # Alternate servers within each run, so drift on a shared machine hits both alike. Only the
  # server being measured is busy; the other sits idle on the same CPU.
  for run in $(seq "$runs"); do
    for server in meshd knot; do
      if [ "$server" = meshd ]; then port=$meshd_port pid=$meshd_pid; else port=$knot_port pid=$knot_pid; fi
      result=$(measure "$port" "$pid" "$client_cpu")
      read -r q l lost c resp codes <<<"$result"
      qps[$mode.$server]+="$q " lat[$mode.$server]+="$l " cpu[$mode.$server]+="$c "
      perf[$mode.$server]+="$(awk -v q="$q" -v c="$c" 'BEGIN { printf "%d", (c > 0 ? q * 100 / c : 0) }') "
      info[$mode.$server]="response $resp B; $codes"
      echo "$mode run $run $server: $q QPS, avg latency $l ms, lost $lost, server CPU $c %, response $resp B, $codes" >&2
    done
  done
  stop "$meshd_pid"; meshd_pid=""
  stop "$knot_pid"; knot_pid=""
done

declare -A insns_per_query
if [[ " $modes " == *" insns "* ]]; then
  for server in meshd knot; do
    count_instructions "$server"
    echo "insns $server: ${insns_per_query[$server]} instructions per query" >&2
  done
fi

for mode in $modes; do
  [ "$mode" = insns ] && continue
  case "$mode" in
    pinned) desc="each server alone on CPU 0, knot with 1 UDP worker, dnsperf on CPU 1" ;;
    free) desc="nothing pinned, knot with its default workers ($(nproc) CPUs)" ;;
  esac
  printf '\n%s: %s; dnsperf UDP, 100 outstanding, %s s x %s runs\n' "$mode" "$desc" "$seconds" "$runs"
  printf '%-6s %8s %8s %8s %7s %11s %8s %10s %7s  %s\n' server min median max ratio latency-ms CPU-% QPS/CPU-s ratio answers
  for server in meshd knot; do
    med[$server]=$(values "${qps[$mode.$server]}" | median)
    eff[$server]=$(values "${perf[$mode.$server]}" | median)
  done
  for server in meshd knot; do
    read -r -a s <<<"$(values "${qps[$mode.$server]}" | sort -n | tr '\n' ' ')"
    ratio="" eratio=""
    if [ "$server" = meshd ]; then ratio=$(percent "${med[meshd]}" "${med[knot]}") eratio=$(percent "${eff[meshd]}" "${eff[knot]}"); fi
    printf '%-6s %8s %8s %8s %7s %11s %8s %10s %7s  %s\n' "$server" "${s[0]}" "${med[$server]}" "${s[-1]}" "$ratio" \
      "$(values "${lat[$mode.$server]}" | median)" "$(values "${cpu[$mode.$server]}" | median)" "${eff[$server]}" "$eratio" "${info[$mode.$server]}"
  done
done
if [[ " $modes " == *" insns "* ]]; then
  printf '\ninsns: user-space instructions per query (callgrind; one pass of %s queries at 3000 QPS, one UDP worker)\n' \
    "$(wc -l <"$state/queries.txt")"
  printf '%-6s %12s %s\n' server instructions "meshd/knot"
  printf '%-6s %12s %s\n' meshd "${insns_per_query[meshd]}" \
    "$(awk -v a="${insns_per_query[meshd]}" -v b="${insns_per_query[knot]}" 'BEGIN { if (b > 0) printf "%.1fx", a / b }')"
  printf '%-6s %12s\n' knot "${insns_per_query[knot]}"
fi
