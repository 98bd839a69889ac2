#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that take input from the network (fuzz/fuzz_targets/):
# libFuzzer through cargo-fuzz on the nightly toolchain, each target for the given time. Prints,
# per target, the CPU-seconds it got (less than the wall time when the machine is busy), the
# executions per second and the coverage libFuzzer reached; a crash stops the run with the
# input saved under fuzz/artifacts/TARGET/ (make it a regression test).
# The corpus grows in fuzz/corpus/TARGET/ (not in git) across runs.
#
# usage: bench/fuzz.sh [--seconds S] [--smoke] [TARGET...]
#   --smoke   10 seconds per target (CI)
# Installs the nightly toolchain (rustup) and cargo-fuzz (crates.io) when missing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

seconds=1800 targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --smoke) seconds=10; shift ;;
    -*) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
command -v rustup >/dev/null || { echo "rustup is needed for the nightly toolchain (https://rustup.rs)" >&2; exit 1; }
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "installing the nightly toolchain (rustup)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz from crates.io" >&2
  cargo install --quiet --locked cargo-fuzz
fi
cd "$root/fuzz"
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
cargo +nightly fuzz build

printf '%-12s %8s %8s %10s %8s %s\n' target seconds cpu-s execs/s cov result
failed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  # The fuzzer's CPU time (user + system, the children's that were waited for).
  TIMEFORMAT='%U %S'
  if { time cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; } 2>"$log.cpu"; then
    result=ok
  else
    result="CRASH (input in fuzz/artifacts/$t/; log $log)"
    failed=1
  fi
  execs=$(awk '/stat::average_exec_per_sec/ {print $NF}' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}' || true)
  cpu=$(awk '{printf "%.0f", $1 + $2}' "$log.cpu")
  printf '%-12s %8s %8s %10s %8s %s\n' "$t" "$seconds" "$cpu" "${execs:--}" "${cov:--}" "$result"
  rm -f "$log.cpu"
  [ "$result" = ok ] && rm -f "$log"
done
exit "$failed"
