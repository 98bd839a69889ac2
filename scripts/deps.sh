#!/usr/bin/env bash
# Installs the Debian packages meshd's lab, tests and benchmarks use, when missing. Sourced by
# scripts/lab.sh, scripts/test.sh and the bench/*.sh scripts; needs root to
# install.
set -euo pipefail

# command -> Debian package providing it
declare -A MESHD_PACKAGES=(
  [ip]=iproute2
  [ping]=iputils-ping
  [iperf3]=iperf3
  [dig]=dnsutils
  [wg]=wireguard-tools
  [wireguard-go]=wireguard-go
  [ethtool]=ethtool
  [curl]=curl
  [python3]=python3
  [dnsperf]=dnsperf
  [knotd]=knot
  [valgrind]=valgrind
  [openssl]=openssl
  [cc]=gcc
)
# header file -> Debian package providing it (bench/hot-path.sh builds against libcrypto)
declare -A MESHD_HEADERS=(
  [/usr/include/openssl/evp.h]=libssl-dev
)
# python3 module -> Debian package providing it (tests/join.rs reads YAML with PyYAML)
declare -A MESHD_PYTHON_MODULES=(
  [yaml]=python3-yaml
)

ensure_packages() {
  local missing=()
  for cmd in "${!MESHD_PACKAGES[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${MESHD_PACKAGES[$cmd]}")
  done
  for header in "${!MESHD_HEADERS[@]}"; do
    [ -f "$header" ] || missing+=("${MESHD_HEADERS[$header]}")
  done
  for module in "${!MESHD_PYTHON_MODULES[@]}"; do
    python3 -c "import $module" >/dev/null 2>&1 || missing+=("${MESHD_PYTHON_MODULES[$module]}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]}; run as root (or: apt-get install ${missing[*]})" >&2
    return 1
  fi
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 || {
    echo "cargo not found: install Rust (rustup) first" >&2
    return 1
  }
}
