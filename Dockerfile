# syntax=docker/dockerfile:1
# The kubelock image: one static binary (controller, sidecar, `run`/`acquire` and the CLI)
# on distroless/static, running as a non-root user.
#
#   docker build -t kubelock:dev .
#   docker run --rm kubelock:dev --version
#
# Apps that wrap a command with `kubelock run` copy the binary into their own image:
#   COPY --from=ghcr.io/kubelock/kubelock:0.1.0 /usr/local/bin/kubelock /usr/local/bin/kubelock

ARG RUST_VERSION=1.95

# Build: Alpine's Rust targets musl and links statically (rustls + ring; no OpenSSL).
FROM rust:${RUST_VERSION}-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Without the `dev` feature: the local control plane of `kubelock dev` and the tests does not ship.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin kubelock \
 && install -D -m 0755 target/release/kubelock /out/kubelock

# Run: no shell, no libc, no package manager; uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kubelock" \
      org.opencontainers.image.description="Kubernetes-native distributed locks: controller, sidecar and CLI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/kubelock/kubelock" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/kubelock /usr/local/bin/kubelock
# Fails the build if the binary is not static: this image has no dynamic loader.
RUN ["/usr/local/bin/kubelock", "--version"]
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubelock"]
CMD ["--help"]
