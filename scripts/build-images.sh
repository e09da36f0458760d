#!/usr/bin/env bash
# Builds HeteroTune's container images (images/*.Dockerfile, the repo root as context):
#
#   <registry>/operator:<tag>        images/operator.Dockerfile: heterotune-operator
#   <registry>/trainer:<tag>         images/trainer.Dockerfile: heterotune + heterotune-trainer,
#                                    CPU libtorch, the packaged models and data
#   <registry>/trainer:<tag>-cuda    the same with CUDA libtorch (--cuda)
#
#   scripts/build-images.sh [--only operator|trainer] [--cuda] [--prebuilt DIR] [--local-base]
#                           [--kind CLUSTER] [--push] [--dry-run]
#
#   --only NAME     build one image (default: both)
#   --cuda          trainer with PyPI's CUDA torch wheel (TORCH_INDEX_URL=https://pypi.org/simple,
#                   the CUDA 13.0 build scripts/requirements.txt pins), tagged <tag>-cuda
#   --kind CLUSTER  load the images into that kind cluster (kind load docker-image, or
#                   image-archive for podman and buildah)
#   --prebuilt DIR  take the binaries (and for the trainer libtorch and the packaged models)
#                   from DIR instead of building them in the image (PARTS=prebuilt, the
#                   build context `prebuilt`): DIR/bin/{heterotune-operator,heterotune,
#                   heterotune-trainer}, DIR/site-packages/torch/lib/, DIR/cache/{models,data}/
#                   (tests/images/smoke.sh stages it from the host's build, venv and cache)
#   --local-base    buildah only: make the runtime base image (RUNTIME_IMAGE's default,
#                   debian:bookworm-slim) locally from `debootstrap --variant=minbase bookworm`
#                   and the Debian mirror of the host's apt sources, where no registry is
#                   reachable; the tree is kept in $HETEROTUNE_CACHE/images/. With --prebuilt
#                   no other base image is needed
#   --push          push the images (log in to the registry first)
#   --dry-run       print the commands, run nothing (no engine needed)
#
# Environment:
#   HETEROTUNE_IMAGE_REGISTRY  default ghcr.io/heterotune: the chart's image.repository and the
#                              operator's default trainer image (config.jobs.trainerImage)
#   HETEROTUNE_IMAGE_TAG       default dev. The chart and the operator default to the workspace
#                              version (Cargo.toml, e.g. 0.1.0): build with that tag for a release,
#                              or pass the images explicitly (as tests/e2e/run.sh does)
#   HETEROTUNE_IMAGE_ENGINE    docker, podman or buildah (default: the first one that answers)
#   TORCH_INDEX_URL            the trainer's torch wheel index (overrides the CPU default and --cuda)
#   STORAGE_DRIVER, BUILDAH_ISOLATION  buildah's own (vfs and chroot where overlay and user
#                              namespaces are missing); on vfs every cached layer is a full copy
#                              of the file system, so buildah builds without --layers there
#   HETEROTUNE_BUILD_ARGS      more arguments for the build command, split on spaces, e.g.
#                              "--build-arg RUNTIME_IMAGE=mirror.example/debian:bookworm-slim"
#
# The trainer image converts the models at build time (scripts/assets.py): the build needs PyPI,
# crates.io, the Debian mirrors, the base images' registry and, for the CPU wheel,
# download.pytorch.org. See docs/operator.md, "Images".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { echo "build-images: $*" >&2; exit 2; }

only="" cuda=0 kind_cluster="" push=0 dry_run=0 prebuilt="" local_base=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) [ $# -ge 2 ] || die "--only needs operator or trainer"; only="$2"; shift 2 ;;
    --only=*) only="${1#*=}"; shift ;;
    --cuda) cuda=1; shift ;;
    --kind) [ $# -ge 2 ] || die "--kind needs a cluster name"; kind_cluster="$2"; shift 2 ;;
    --kind=*) kind_cluster="${1#*=}"; shift ;;
    --prebuilt) [ $# -ge 2 ] || die "--prebuilt needs a folder"; prebuilt="$2"; shift 2 ;;
    --prebuilt=*) prebuilt="${1#*=}"; shift ;;
    --local-base) local_base=1; shift ;;
    --push) push=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$only" in
  "") targets=(operator trainer) ;;
  operator|trainer) targets=("$only") ;;
  *) die "--only takes operator or trainer, not '$only'" ;;
esac
if [ -n "$kind_cluster" ] && [ "$dry_run" = 0 ] && ! command -v kind > /dev/null; then
  die "--kind: kind is not installed (https://kind.sigs.k8s.io)"
fi

if [ -n "$prebuilt" ]; then
  [ -d "$prebuilt" ] || [ "$dry_run" = 1 ] || die "--prebuilt $prebuilt: no such folder"
  prebuilt="$(cd "$prebuilt" 2>/dev/null && pwd || echo "$prebuilt")"
fi

registry="${HETEROTUNE_IMAGE_REGISTRY:-ghcr.io/heterotune}"
registry="${registry%/}"
tag="${HETEROTUNE_IMAGE_TAG:-dev}"
torch_index="${TORCH_INDEX_URL:-}"
trainer_tag="$tag"
if [ "$cuda" = 1 ]; then
  torch_index="${torch_index:-https://pypi.org/simple}"
  trainer_tag="$tag-cuda"
fi

# The labels' values.
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$revision" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# ---------------------------------------------------------------- engine
# Which engine answers, and why the others do not (for the error message).
why=()
engine_works() {
  local e="$1"
  if ! command -v "$e" > /dev/null; then
    why+=("$e: not installed")
    return 1
  fi
  local out last
  if ! out="$("$e" info 2>&1 > /dev/null)"; then
    last="$(printf '%s\n' "$out" | sed '/^[[:space:]]*$/d' | tail -n1)"
    why+=("$e: installed, but '$e info' fails${last:+: $last}")
    return 1
  fi
}
engine="${HETEROTUNE_IMAGE_ENGINE:-}"
if [ "$local_base" = 1 ] && [ -z "$engine" ]; then engine=buildah; fi
if [ -n "$engine" ]; then
  case "$engine" in docker|podman|buildah) ;; *) die "HETEROTUNE_IMAGE_ENGINE must be docker, podman or buildah, not '$engine'" ;; esac
  if [ "$dry_run" = 0 ] && ! engine_works "$engine"; then
    die "HETEROTUNE_IMAGE_ENGINE=$engine does not work here (${why[*]})"
  fi
else
  for e in docker podman buildah; do
    if engine_works "$e"; then engine="$e"; break; fi
  done
  if [ -z "$engine" ]; then
    if [ "$dry_run" = 1 ]; then
      engine=docker
    else
      {
        echo "build-images: no container engine to build with:"
        printf '  %s\n' "${why[@]}"
        echo "Install and start one (Docker, or Podman/Buildah: rootless, or as root with"
        echo "BUILDAH_ISOLATION=chroot and STORAGE_DRIVER=vfs where no daemon or overlay is"
        echo "available), or set HETEROTUNE_IMAGE_ENGINE; --dry-run prints the commands."
      } >&2
      exit 2
    fi
  fi
fi

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$dry_run" = 1 ] || "$@"
}

build() { # dockerfile image [build args...]
  local file="$1" image="$2"; shift 2
  local cmd
  case "$engine" in
    docker) cmd=(env DOCKER_BUILDKIT=1 docker build) ;;
    podman) cmd=(podman build --layers) ;;
    buildah)
      cmd=(buildah build)
      [ "${STORAGE_DRIVER:-}" = vfs ] || cmd+=(--layers)
      ;;
  esac
  # Buildah 1.28 resolves `FROM parts-${PARTS}` only for a PARTS given explicitly.
  if [ -n "$prebuilt" ]; then
    cmd+=(--build-arg PARTS=prebuilt --build-context "prebuilt=$prebuilt")
  else
    cmd+=(--build-arg PARTS=source)
  fi
  if [ "$local_base" = 1 ]; then cmd+=(--pull=never); fi
  local extra=()
  if [ -n "${HETEROTUNE_BUILD_ARGS:-}" ]; then
    # shellcheck disable=SC2206 # split on spaces, as documented
    extra=(${HETEROTUNE_BUILD_ARGS})
  fi
  run "${cmd[@]}" -f "$file" -t "$image" \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
    "$@" "${extra[@]+"${extra[@]}"}" .
}

load_into_kind() { # image
  local image="$1"
  if [ "$engine" = docker ]; then
    run kind load docker-image "$image" --name "$kind_cluster"
    return
  fi
  local dir archive
  dir="$(mktemp -d)"
  archive="$dir/image.tar"
  if [ "$engine" = podman ]; then
    run podman save -o "$archive" "$image"
  else
    run buildah push "$image" "docker-archive:$archive:$image"
  fi
  run kind load image-archive "$archive" --name "$kind_cluster"
  rm -rf "$dir"
}

# ---------------------------------------------------------------- local base image
# debootstrap's tree of bookworm, cached, committed as the runtime base image.
apt_mirror() { # the host's Debian mirror for bookworm (deb822 .sources or one-line .list)
  # awk reads the files that exist itself: no pipe, so neither a missing
  # glob nor awk's early exit can fail the caller under pipefail.
  local f files=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    if [ -f "$f" ]; then files+=("$f"); fi
  done
  [ "${#files[@]}" -gt 0 ] || return 0
  awk '
    /^deb[ \t]/ { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { if ($(i + 1) == "bookworm") { print $i; exit } break } }
    /^URIs:/ { uri = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm" && uri != "") { print uri; exit } }
    /^[ \t]*$/ { uri = "" }' "${files[@]}"
}
make_local_base() {
  local base="docker.io/library/debian:bookworm-slim"
  local dir="${HETEROTUNE_CACHE:-$HOME/.cache/heterotune}/images"
  local tree="$dir/bookworm-minbase.tar" mirror c
  if [ ! -s "$tree" ] || [ -n "$(find "$tree" -mtime +30 2> /dev/null)" ]; then
    command -v debootstrap > /dev/null || die "--local-base: debootstrap is not installed (apt-get install debootstrap)"
    mirror="$(apt_mirror)"
    [ -n "$mirror" ] || die "--local-base: no Debian mirror for bookworm in /etc/apt/sources.list*"
    echo "build-images: debootstrap --variant=minbase bookworm from $mirror (about a minute)"
    mkdir -p "$dir"
    rm -rf "$dir/bookworm-minbase.tmp"
    run debootstrap --variant=minbase bookworm "$dir/bookworm-minbase.tmp" "$mirror" > "$dir/debootstrap.log" 2>&1 \
      || die "--local-base: debootstrap failed: see $dir/debootstrap.log"
    rm -f "$dir/bookworm-minbase.tmp"/var/cache/apt/archives/*.deb
    run tar -C "$dir/bookworm-minbase.tmp" -cf "$tree.tmp" . && mv "$tree.tmp" "$tree"
    rm -rf "$dir/bookworm-minbase.tmp"
  fi
  if buildah inspect --type image "$base" > /dev/null 2>&1; then return; fi
  c="$(buildah from scratch)"
  run buildah add --quiet "$c" "$tree" / > /dev/null
  run buildah config --cmd /bin/bash "$c"
  run buildah commit --quiet --rm "$c" "$base" > /dev/null
  echo "build-images: made $base from $tree"
}
if [ "$local_base" = 1 ] && [ "$dry_run" = 0 ]; then
  [ "$engine" = buildah ] || die "--local-base needs buildah (HETEROTUNE_IMAGE_ENGINE=buildah)"
  make_local_base
fi

# ---------------------------------------------------------------- build
echo "build-images: engine $engine, registry $registry, tag $tag${torch_index:+, torch from $torch_index}"
built=()
for t in "${targets[@]}"; do
  case "$t" in
    operator)
      image="$registry/operator:$tag"
      build images/operator.Dockerfile "$image"
      ;;
    trainer)
      image="$registry/trainer:$trainer_tag"
      args=()
      if [ -n "$torch_index" ]; then args=(--build-arg "TORCH_INDEX_URL=$torch_index"); fi
      build images/trainer.Dockerfile "$image" "${args[@]+"${args[@]}"}"
      ;;
  esac
  built+=("$image")
done

for image in "${built[@]}"; do
  if [ -n "$kind_cluster" ]; then load_into_kind "$image"; fi
  if [ "$push" = 1 ]; then run "$engine" push "$image"; fi
done

if [ "$dry_run" = 0 ]; then
  for image in "${built[@]}"; do
    "$engine" images "$image" 2> /dev/null | tail -n +2 || true
  done
fi
echo "build-images: images:"
printf '  %s\n' "${built[@]}"
