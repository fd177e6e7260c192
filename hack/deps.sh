#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a Debian/Ubuntu machine, skipping what is
# already there, so that it is quick and quiet on every run after the first:
#   - a C toolchain and curl (Debian packages gcc, libc6-dev, make, curl, ca-certificates):
#     the `ring` crate compiles C, rustup and the readiness checks use curl;
#   - Rust >= $MIN_RUST via rustup (into ~/.cargo) if cargo is missing or older;
#   - etcd and kube-apiserver: `src/devenv/control-plane.sh install` (the first time this builds
#     kube-apiserver from Debian's source with Go 1.15, about 7 minutes, and caches it in
#     ${KUBELOCK_CACHE:-${XDG_CACHE_HOME:-~/.cache}/kubelock});
#   - what the local node needs (the e2e tests' node:: module): `src/devenv/node.sh install`
#     (containerd, runc, CNI plugins, iptables, busybox-static, umoci from Debian).
# apt-get runs as root, or through sudo.
set -euo pipefail

MIN_RUST=1.89
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "deps: error: $*" >&2; exit 1; }
log() { echo "deps: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $* (no sudo found)"; fi
}

apt_install() {
  local missing=() p
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} yourself"
  log "installing ${missing[*]} (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 ||
    { as_root apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; } ||
    die "apt-get install ${missing[*]} failed"
}

# version_ge A B: A >= B for dotted versions.
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

rust() {
  export PATH="$HOME/.cargo/bin:$PATH"
  local have=""
  if command -v cargo >/dev/null; then have=$(cargo --version | awk '{print $2}'); fi
  if [ -n "$have" ] && version_ge "$have" "$MIN_RUST"; then return 0; fi
  if command -v rustup >/dev/null; then
    log "Rust ${have:-missing}, need >= $MIN_RUST: rustup update stable"
    rustup toolchain install stable --profile minimal >&2
    rustup default stable >&2
  else
    [ -z "$have" ] || die "cargo $have is older than $MIN_RUST and was not installed by rustup: upgrade it (https://rustup.rs)"
    log "installing Rust (rustup, stable, into ~/.cargo)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y -q --profile minimal >&2 ||
      die "rustup install failed: see https://rustup.rs"
  fi
  version_ge "$(cargo --version | awk '{print $2}')" "$MIN_RUST" || die "Rust >= $MIN_RUST still not on PATH"
}

main() {
  if command -v dpkg-query >/dev/null; then
    apt_install gcc libc6-dev make curl ca-certificates
  else
    for tool in cc make curl; do command -v "$tool" >/dev/null || die "$tool not found: install it"; done
  fi
  rust
  "$HERE/../src/devenv/control-plane.sh" install
  "$HERE/../src/devenv/node.sh" install
}

main "$@"
