#!/usr/bin/env bash
# Builds static (musl) release binaries of meshd and meshctl for one architecture and lays them
# out as the image's root filesystem: DEST/usr/local/bin/{meshd,meshctl}, DEST/run, and
# DEST/var/run -> /run (meshd's UAPI socket lives in /var/run/wireguard, and the image's root is
# read-only: the DaemonSet mounts a writable /run), with Debian's nft beside them
# (scripts/nft-rootfs.sh: the masquerade bypass needs it). Used by scripts/image.sh on the host and by
# deploy/Dockerfile's build stage, so both build the same way.
#
# usage: scripts/build-static.sh amd64|arm64 DEST
# env:   CARGO_TARGET_DIR as cargo's (default: target/)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
[ $# -eq 2 ] || { echo "usage: $0 amd64|arm64 DEST" >&2; exit 2; }
arch=$1 dest=$2
case "$arch" in
  amd64) target=x86_64-unknown-linux-musl ;;
  arm64)
    target=aarch64-unknown-linux-musl
    # Debian's aarch64 cross compiler links (with Rust's own musl C runtime) and compiles ring's C.
    command -v aarch64-linux-gnu-gcc >/dev/null || {
      echo "aarch64-linux-gnu-gcc is needed for arm64: apt-get install gcc-aarch64-linux-gnu" >&2
      exit 1
    }
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
    export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
    export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
    ;;
  *) echo "unknown architecture '$arch': amd64 or arm64" >&2; exit 2 ;;
esac
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
cd "$root"
# No debug info in the image: it is most of the binary's size (stripped at link time only, so
# the compiled code is the release profile's).
CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked --target "$target" --bins
built="${CARGO_TARGET_DIR:-$root/target}/$target/release"
mkdir -p "$dest/usr/local/bin" "$dest/run" "$dest/var"
cp "$built/meshd" "$built/meshctl" "$dest/usr/local/bin/"
ln -sfn /run "$dest/var/run"
"$here/nft-rootfs.sh" "$arch" "$dest"
echo "$dest: meshd and meshctl for linux/$arch ($target)"
