#!/usr/bin/env bash
# Puts Debian's nft (the nftables tool meshd runs for the masquerade bypass, src/node/bypass.rs)
# with the shared libraries it loads into an image's root filesystem, for one architecture:
# DEST/usr/sbin/nft, its libraries under DEST/lib/<triplet>/ and the dynamic loader. Debian's
# own packages (apt-get download, nothing installed on this host); for arm64 the arm64 ones,
# which needs dpkg's arm64 architecture (added when missing). Used by scripts/build-static.sh.
#
# usage: scripts/nft-rootfs.sh amd64|arm64 DEST
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 amd64|arm64 DEST" >&2; exit 2; }
arch=$1 dest=$2
case "$arch" in
  amd64) triplet=x86_64-linux-gnu loader=/lib64/ld-linux-x86-64.so.2 ;;
  arm64) triplet=aarch64-linux-gnu loader=/lib/ld-linux-aarch64.so.1 ;;
  *) echo "unknown architecture '$arch': amd64 or arm64" >&2; exit 2 ;;
esac
# nft and what `ldd /usr/sbin/nft` lists on Debian bookworm, by package.
packages=(nftables libnftables1 libnftnl11 libmnl0 libjansson4 libgmp10 libxtables12 libedit2
  libbsd0 libmd0 libtinfo6 libc6)
if [ "$(dpkg --print-architecture)" != "$arch" ] && ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
  echo "adding dpkg architecture $arch (for Debian's $arch nftables packages)" >&2
  dpkg --add-architecture "$arch"
  apt-get update -qq >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]/%/:$arch}" >/dev/null) || {
  apt-get update -qq >/dev/null
  (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]/%/:$arch}" >/dev/null)
}
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
# Debian bookworm's packages install under /lib and /usr/lib; the image gets both layouts' files
# where the loader looks (its default directories include /lib/<triplet> and /usr/lib/<triplet>).
mkdir -p "$dest/usr/sbin" "$dest/lib/$triplet" "$dest$(dirname "$loader")"
cp "$work/root/usr/sbin/nft" "$dest/usr/sbin/nft"
for soname in libnftables.so.1 libnftnl.so.11 libmnl.so.0 libjansson.so.4 libgmp.so.10 \
  libxtables.so.12 libedit.so.2 libbsd.so.0 libmd.so.0 libtinfo.so.6 libc.so.6 "$(basename "$loader")"; do
  file=$(find "$work/root" -name "$soname" | head -1)
  [ -n "$file" ] || { echo "$soname is in none of ${packages[*]} ($arch): the package list needs updating" >&2; exit 1; }
  cp -L "$file" "$dest/lib/$triplet/$soname"
done
[ -e "$dest$loader" ] || ln -sfn "/lib/$triplet/$(basename "$loader")" "$dest$loader"
echo "$dest: nft $(dpkg-deb -f "$(ls "$work"/nftables_*.deb)" Version) for linux/$arch"
