#!/usr/bin/env bash
# Installs the Debian packages meshd's lab, tests and benchmarks use, when missing. Sourced by
# scripts/lab.sh, scripts/test.sh and the bench/*.sh scripts; needs root to
# install.
set -euo pipefail

# command -> Debian package providing it
declare -A MESHD_PACKAGES=(
  [ip]=iproute2
  [ping]=iputils-ping
  [traceroute]=traceroute
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
  [iptables]=iptables
  [nft]=nftables
)
# header file -> Debian package providing it (bench/hot-path.sh builds against libcrypto)
declare -A MESHD_HEADERS=(
  [/usr/include/openssl/evp.h]=libssl-dev
)
# python3 module -> Debian package providing it (tests/join.rs reads YAML with PyYAML)
declare -A MESHD_PYTHON_MODULES=(
  [yaml]=python3-yaml
)

# Installs the Debian packages named (none: nothing to do); needs root.
install_debs() {
  [ $# -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: $*; run as root (or: apt-get install $*)" >&2
    return 1
  fi
  echo "installing: $*" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

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
  install_debs "${missing[@]}"
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

# Installs the Debian packages in "$@" that are missing (by package name).
ensure_debs() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  install_debs "${missing[@]}"
}

# Builds and runs images without a daemon (scripts/image.sh, the lab's --from-image).
ensure_image_tools() {
  ensure_debs podman buildah runc
}

# Cross-compiles for arm64 (scripts/build-static.sh arm64) and runs arm64 binaries here.
ensure_arm64_cross() {
  ensure_debs gcc-aarch64-linux-gnu qemu-user-static
}

# podman and buildah as this kind of machine runs them: runc (crun fails here on setrlimit and
# cgroups) and no default ulimits. Kept when CONTAINERS_CONF is already set.
use_containers_conf() {
  [ -n "${CONTAINERS_CONF:-}" ] && return 0
  local conf="${XDG_CACHE_HOME:-$HOME/.cache}/meshd/containers.conf"
  mkdir -p "$(dirname "$conf")"
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' >"$conf"
  export CONTAINERS_CONF=$conf
}
