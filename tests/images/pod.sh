#!/usr/bin/env bash
# Runs a command in a buildah container's file system the way the chart's and
# the operator's pods run it: as the image's USER (65532:65532), with the
# image's ENV, a read-only root file system, fresh empty tmpfs mounts on /tmp
# and on the image's HOME (the pods' emptyDirs), read-only files mounted where
# a ConfigMap would be, and the host's network (loopback reaches the test's
# SeaweedFS and the operator's HTTP port).
#
#   tests/images/pod.sh CONTAINER [-e NAME=VALUE]... [-v HOST_FILE:PATH]... -- COMMAND [ARG...]
#
# CONTAINER is a `buildah from` container (its image's config gives USER,
# ENV and HOME). The isolation is a private mount namespace and chroot(1),
# as buildah's own `--isolation chroot` (user namespaces and OCI runtimes
# are not available everywhere); root (or CAP_SYS_ADMIN) is needed.
# Used by tests/images/smoke.sh and tests/images.rs.
set -euo pipefail

die() { echo "pod.sh: $*" >&2; exit 2; }
[ $# -ge 1 ] || die "usage: pod.sh CONTAINER [-e NAME=VALUE]... [-v HOST_FILE:PATH]... -- COMMAND [ARG...]"
container="$1"
shift
envs=() vols=()
while [ $# -gt 0 ]; do
  case "$1" in
    -e) [ $# -ge 2 ] || die "-e needs NAME=VALUE"; envs+=("$2"); shift 2 ;;
    -v) [ $# -ge 2 ] || die "-v needs HOST_FILE:PATH"; vols+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (the command follows --)" ;;
  esac
done
[ $# -ge 1 ] || die "no command after --"

fmt() { buildah inspect --type container --format "$1" "$container"; }
user="$(fmt '{{.OCIv1.Config.User}}')" || die "no buildah container $container"
[ -n "$user" ] || die "$container: the image sets no USER (the pods run as non-root)"
case "$user" in *:*) ;; *) user="$user:$user" ;; esac
mapfile -t image_env < <(fmt '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
home=/
for e in "${image_env[@]}"; do
  case "$e" in HOME=*) home="${e#HOME=}" ;; esac
done
rootfs="$(buildah mount "$container")"

# Everything below runs in a private mount namespace: the mounts vanish
# with the command. The script is single-quoted: it takes its values as
# arguments.
# shellcheck disable=SC2016
exec unshare --mount --propagation private --fork --kill-child -- bash -euo pipefail -c '
  rootfs="$1" user="$2" home="$3" nvols="$4"
  shift 4
  vols=("${@:1:$nvols}")
  shift "$nvols"
  for v in "${vols[@]+"${vols[@]}"}"; do
    target="$rootfs/${v#*:}"
    mkdir -p "$(dirname "$target")"
    [ -e "$target" ] || touch "$target"
  done
  mount --bind "$rootfs" "$rootfs"
  mount -o remount,bind,ro "$rootfs"
  mount -t proc proc "$rootfs/proc"
  mount --rbind /dev "$rootfs/dev"
  mount --rbind -o ro /sys "$rootfs/sys"
  mount -t tmpfs -o mode=1777 tmpfs "$rootfs/tmp"
  if [ "$home" != / ] && [ -d "$rootfs$home" ]; then
    mount -t tmpfs -o "mode=0755,uid=${user%%:*},gid=${user##*:}" tmpfs "$rootfs$home"
  fi
  for v in "${vols[@]+"${vols[@]}"}"; do
    mount --bind "${v%%:*}" "$rootfs/${v#*:}"
    mount -o remount,bind,ro "$rootfs/${v#*:}"
  done
  exec chroot --userspec="$user" "$rootfs" /usr/bin/env -i "$@"
' pod "$rootfs" "$user" "$home" "${#vols[@]}" "${vols[@]+"${vols[@]}"}" \
  "${image_env[@]+"${image_env[@]}"}" "${envs[@]+"${envs[@]}"}" "$@"
