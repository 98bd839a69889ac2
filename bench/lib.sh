# shellcheck shell=bash
# Helpers shared by the benchmark scripts (sourced).

# The median of the numbers on standard input, one per line.
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
# The words of $1, one per line (empty words dropped).
values() { tr ' ' '\n' <<<"$1" | grep .; }
# Points MESHD_BIN_DIR at a release build of meshd and meshctl, building it first, unless it is
# set already (to compare builds: MESHD_BIN_DIR=<dir> bench/...). Needs $root.
release_bins() {
  if [ -z "${MESHD_BIN_DIR:-}" ]; then
    (cd "$root" && cargo build --release --quiet --bins)
    export MESHD_BIN_DIR="${CARGO_TARGET_DIR:-$root/target}/release"
  fi
}
