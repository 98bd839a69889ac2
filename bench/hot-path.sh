#!/usr/bin/env bash
# The hot path beside its references, in one run on one machine: criterion's encapsulate +
# decapsulate of 1420-byte packets (meshd's PeerTable, a bare boringtun Tunn, ring's AEAD alone),
# OpenSSL's ChaCha20-Poly1305 sealing and opening the same packets one message each
# (bench/openssl_aead.c), and `openssl speed -evp chacha20-poly1305 -bytes 1024`.
#
# usage: bench/hot-path.sh [--runs N] [--smoke]
#   --runs N   rounds (default 3); each round runs all three, one after the other
#   --smoke    builds and runs the OpenSSL reference and `openssl speed` briefly, once (CI; the
#              suite smoke-runs the criterion bench itself with `cargo test --bench hot_path`)
#
# Prints, in decimal MB/s of packets (criterion's MiB/s converted; its median estimate per run),
# min / median / max of the rounds, and meshd's median as a share of each reference. Note what
# the two OpenSSL figures measure: `openssl speed` encrypts one endless message (no nonce, no tag
# per packet, no decryption), while WireGuard seals every packet as its own message and the other
# side opens it; the per-message figure is the work of one encapsulate + decapsulate.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$root/scripts/deps.sh"
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

runs=3 smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --smoke) runs=1 smoke=1; shift ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
ensure_packages

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc -O2 -Wall -Wextra -Werror -o "$work/openssl_aead" "$here/openssl_aead.c" -lcrypto

iterations=400000 speed_seconds=3
[ "$smoke" -eq 1 ] && iterations=2000 speed_seconds=1

# criterion's "thrpt: [low median high]" line after each benchmark's name, as MB/s.
criterion_mbps() {
  awk -v name="$1" '
    index($0, name) { found = 1 }
    found && /thrpt:/ {
      gsub(/[\[\]]/, "")
      for (i = 1; i <= NF; i++) if ($i == "thrpt:") { v = $(i + 3); u = $(i + 4) }
      f = (u == "GiB/s") ? 1073.741824 : (u == "MiB/s") ? 1.048576 : (u == "KiB/s") ? 0.001024 : 0
      if (f == 0) { print "criterion: unknown unit " u > "/dev/stderr"; exit 1 }
      printf "%.1f\n", v * f
      exit
    }' "$2"
}

declare -A mbps=()
for round in $(seq "$runs"); do
  echo "round $round of $runs" >&2
  if [ "$smoke" -eq 0 ]; then
    ensure_cargo
    (cd "$root" && cargo bench --quiet --bench hot_path -- --noplot) >"$work/criterion.txt" 2>&1 || {
      cat "$work/criterion.txt" >&2
      exit 1
    }
    for name in "meshd PeerTable" "bare boringtun Tunn" "ring AEAD seal+open"; do
      mbps[$name]+="$(criterion_mbps "$name" "$work/criterion.txt") "
    done
  fi
  per_message=$("$work/openssl_aead" 1420 "$iterations" | awk '$1 == "per-message" {print $3}')
  mbps["OpenSSL per-message seal+open"]+="$per_message "
  speed=$(openssl speed -evp chacha20-poly1305 -bytes 1024 -seconds "$speed_seconds" 2>/dev/null |
    awk '/^ChaCha20-Poly1305/ {sub(/k$/, "", $2); printf "%.1f\n", $2 / 1000}')
  [ -n "$speed" ] || { echo "openssl speed printed no ChaCha20-Poly1305 figure" >&2; exit 1; }
  mbps["openssl speed (streaming)"]+="$speed "
done

meshd_median=
[ -n "${mbps["meshd PeerTable"]:-}" ] && meshd_median=$(values "${mbps["meshd PeerTable"]}" | median)
printf '\n%-32s %9s %9s %9s %12s\n' "MB/s of 1420-byte packets" min median max "meshd share"
for name in "meshd PeerTable" "bare boringtun Tunn" "ring AEAD seal+open" \
  "OpenSSL per-message seal+open" "openssl speed (streaming)"; do
  [ -n "${mbps[$name]:-}" ] || continue
  sorted=$(values "${mbps[$name]}" | sort -n)
  md=$(median <<<"$sorted")
  share=$(awk -v a="${meshd_median:-0}" -v b="$md" 'BEGIN { if (a > 0 && b > 0) printf "%.0f%%", 100 * a / b; else print "-" }')
  printf '%-32s %9s %9s %9s %12s\n' "$name" "$(head -1 <<<"$sorted")" "$md" "$(tail -1 <<<"$sorted")" "$share"
done
