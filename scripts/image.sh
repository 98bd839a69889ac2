#!/usr/bin/env bash
# Builds the meshd container image (deploy/Dockerfile) for linux/amd64 and linux/arm64 with the
# builder that is present (docker buildx, else podman, else buildah), tags one image per
# architecture, writes them and a manifest list over them to DIR, and reports each image's size.
#
# usage: scripts/image.sh [--arch amd64|arm64|all] [--offline] [--builder docker|podman|buildah]
#                         [--tag NAME:VERSION] [--out DIR]
#   --arch     which architectures (default: all)
#   --offline  compile on this host (scripts/build-static.sh) and build on the empty base: no
#              registry is needed. Without it the Dockerfile compiles in rust:1-bookworm, pulled
#              from Docker Hub, as a user's own `docker buildx build` would.
#   --tag      the manifest list's name (default meshd:VERSION from Cargo.toml); each
#              architecture's image is NAME:VERSION-ARCH
#   --out DIR  where to write DIR/meshd-VERSION-ARCH.tar (docker-archive: `docker load -i`,
#              `kind load image-archive`) and, with podman or buildah, DIR/meshd-VERSION.oci.tar
#              (the manifest list over every architecture built so far, with their images, OCI
#              layout: `podman manifest push --all` to a registry, or `skopeo copy --all`).
#              Default target/image. (The list is not kept in podman's storage: podman 4.3's
#              `podman images` fails while a manifest list is stored.)
# Installs podman, buildah and runc (when there is no docker), and gcc-aarch64-linux-gnu for an
# offline arm64 build, when missing (Debian, as root).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=scripts/deps.sh
. "$here/deps.sh"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
archs="amd64 arm64" offline=0 builder="" tag="meshd:$version" out="$root/target/image"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) case "$2" in all) archs="amd64 arm64" ;; amd64|arm64) archs=$2 ;; *) echo "--arch: amd64, arm64 or all, not '$2'" >&2; exit 2 ;; esac; shift 2 ;;
    --offline) offline=1; shift ;;
    --builder) builder=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown option: $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
case "$tag" in *:*) ;; *) echo "--tag needs NAME:VERSION, not '$tag'" >&2; exit 2 ;; esac

if [ -z "$builder" ]; then
  if command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
    builder=docker
  elif command -v podman >/dev/null 2>&1; then
    builder=podman
  elif command -v buildah >/dev/null 2>&1; then
    builder=buildah
  else
    ensure_image_tools
    builder=podman
  fi
fi
case "$builder" in
  docker|podman|buildah) ;;
  *) echo "--builder: docker, podman or buildah, not '$builder'" >&2; exit 2 ;;
esac
[ "$builder" = docker ] || ensure_image_tools
use_containers_conf

revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
source_url=$(git -C "$root" config --get remote.origin.url 2>/dev/null || echo unknown)
args=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source_url")
context=$root
if [ "$offline" = 1 ]; then
  ensure_cargo
  context=$(mktemp -d)
  trap 'rm -rf "$context"' EXIT
  for arch in $archs; do
    [ "$arch" = arm64 ] && ensure_arm64_cross
    "$here/build-static.sh" "$arch" "$context/rootfs-$arch"
  done
  args+=(--build-arg BINARIES=prebuilt)
fi

name=${tag%:*}
for arch in $archs; do
  image="$tag-$arch"
  echo "== building $image (linux/$arch, $builder$([ "$offline" = 1 ] && echo ", offline"))" >&2
  case "$builder" in
    docker) docker buildx build --platform "linux/$arch" -f "$root/deploy/Dockerfile" "${args[@]}" -t "$image" --load "$context" ;;
    podman) podman build --platform "linux/$arch" -f "$root/deploy/Dockerfile" "${args[@]}" -t "$image" "$context" ;;
    buildah) buildah build --platform "linux/$arch" -f "$root/deploy/Dockerfile" "${args[@]}" -t "$image" "$context" ;;
  esac
done

engine=$builder
[ "$engine" = buildah ] && engine=podman
base=$(basename "${tag%:*}")
mkdir -p "$out"
printf '%-24s %-12s %14s %18s\n' image platform "size (bytes)" "gzip'd layers"
for arch in $archs; do
  image="$tag-$arch"
  tar="$out/$base-$version-$arch.tar"
  rm -f "$tar"
  if [ "$builder" = docker ]; then
    docker save -o "$tar" "$image"
  else
    podman save -q --format docker-archive -o "$tar" "localhost/$image" >/dev/null
  fi
  printf '%-24s %-12s %14s %18s\n' "$image" "linux/$arch" "$(stat -c %s "$tar")" "$(gzip -c "$tar" | wc -c)"
done

# The manifest list: one name for both architectures, as a registry serves it.
if [ "$engine" = podman ]; then
  list="$out/$base-$version.oci.tar"
  rm -f "$list"
  $builder manifest rm "$tag" >/dev/null 2>&1 || true
  $builder manifest create "$tag" >/dev/null
  included=()
  for arch in amd64 arm64; do
    podman image exists "localhost/$tag-$arch" || continue
    $builder manifest add "$tag" "containers-storage:localhost/$tag-$arch" >/dev/null
    included+=("linux/$arch")
  done
  podman manifest push --all "$tag" "oci-archive:$list" >/dev/null 2>&1
  $builder manifest rm "$tag" >/dev/null
  echo "$list: manifest list $tag over ${included[*]}" >&2
else
  echo "docker keeps no local manifest lists: push the per-architecture images, then" >&2
  echo "  docker buildx imagetools create -t REGISTRY/$tag $(for a in $archs; do printf 'REGISTRY/%s ' "$tag-$a"; done)" >&2
fi
