# The HeteroTune operator image: `heterotune-operator` (the controller the
# Helm chart's Deployment runs) on Debian slim with CA certificates (the
# operator reads the object store over https). Pure Rust: no libtorch.
#
#   scripts/build-images.sh --only operator          (or, by hand, from the repo root:)
#   docker build -f images/operator.Dockerfile -t ghcr.io/heterotune/operator:dev .
#
# The Deployment runs it as UID/GID 65532 with a read-only root filesystem;
# it writes nothing to disk and serves /healthz, /readyz and /metrics on
# --http-addr (8080 by default). See docs/operator.md, "Images".
# tests/images/check.sh checks this file statically (COPY sources, binary
# names, user, hadolint).

# Base images, pinned by tag, fully qualified (podman and buildah resolve no
# short names by default); override with --build-arg for a mirror.
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# Where the binary comes from: `source` (the build stage below, the default)
# or `prebuilt`, a binary built on the host, given as the build context
# `prebuilt` holding bin/heterotune-operator:
#   buildah build --build-arg PARTS=prebuilt --build-context prebuilt=DIR ...
# (scripts/build-images.sh --prebuilt DIR; the image tests use it). Buildah
# 1.28 resolves the stage only when PARTS is passed explicitly.
ARG PARTS=source

# ---------------------------------------------------------------- build
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Every workspace member: cargo loads the whole workspace even for one binary.
COPY Cargo.toml Cargo.lock ./
COPY crds crds
COPY operator operator
COPY trainer trainer
COPY tests tests
# No debug info in the image (the workspace's release profile keeps line
# tables for local profiling); symbols stay, so backtraces name functions.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TARGET_DIR=/cargo-target
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cargo-target,id=heterotune-operator-target \
    cargo build --release --locked -p heterotune-operator --bin heterotune-operator \
 && install -D -m 0755 /cargo-target/release/heterotune-operator /out/bin/heterotune-operator

# ---------------------------------------------------------------- parts
FROM scratch AS parts-source
COPY --from=build /out/bin/ /out/bin/

FROM scratch AS parts-prebuilt
# `prebuilt` is a build context, not a stage (DL3022).
# hadolint ignore=DL3022
COPY --from=prebuilt bin/heterotune-operator /out/bin/

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
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 heterotune \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin heterotune
COPY --from=parts /out/bin/ /usr/local/bin/
# Smoke test at build time: the binary starts in this runtime.
RUN heterotune-operator --version
# Labels last: VERSION, REVISION and CREATED change with every build and
# must not invalidate the cached layers above.
ARG VERSION=unknown
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://example.invalid/heterotune
LABEL org.opencontainers.image.title="heterotune-operator" \
      org.opencontainers.image.description="HeteroTune Kubernetes operator: runs FederatedTune resources as trainer and aggregation Jobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["heterotune-operator"]
