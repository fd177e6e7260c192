#!/usr/bin/env bash
# Container images without Docker (`make image`, `make image-load`; docs/local-node.md).
#
#   hack/image.sh build   the static kubelock binary (musl, built like the Dockerfile builds it),
#                         then two OCI image tarballs in $IMAGE_DIR:
#                           kubelock.oci.tar       docker.io/library/kubelock:dev: the Dockerfile's final
#                                                  stage (binary, user, entrypoint, cmd, labels, read from
#                                                  the Dockerfile) on the files distroless/static provides
#                           kubelock-test.oci.tar  docker.io/library/kubelock-test:dev: busybox (sh, sleep,
#                                                  wget, nc, ...) and the same kubelock binary, for tests
#                                                  and examples
#   hack/image.sh load    import both into the running local node's containerd (`kubelock dev --node`)
#
# Environment: IMAGE_DIR (default $CARGO_TARGET_DIR/image, else target/image), VERSION (the
# version label; default the Dockerfile's ARG VERSION). The musl build is cached in the cargo
# target directory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Helpers (die, log, apt_install) of the control-plane script.
KUBELOCK_SCRIPT_NAME=hack/image.sh . "$ROOT/src/devenv/control-plane.sh"
die() { echo "image: error: $*" >&2; exit 1; }
log() { echo "image: $*" >&2; }
NODE_SCRIPT="$ROOT/src/devenv/node.sh"
MUSL=x86_64-unknown-linux-musl
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
IMAGE_DIR=${IMAGE_DIR:-$TARGET_DIR/image}
IMAGE=docker.io/library/kubelock:dev
TEST_IMAGE=docker.io/library/kubelock-test:dev
export PATH="$HOME/.cargo/bin:$PATH"

# The Dockerfile's final stage, continuation lines joined.
final_stage() {
  sed -e ':a' -e '/\\$/N; s/\\\n/ /; ta' "$ROOT/Dockerfile" | awk '/^FROM / {stage = ""} {stage = stage $0 "\n"} END {printf "%s", stage}'
}

# json_array '["a", "b"]' prints a and b, one a line (the exec form of ENTRYPOINT and CMD).
json_array() {
  local s=$1 item
  [[ $s =~ ^[[:space:]]*\[(.*)\][[:space:]]*$ ]] || return 1
  s=${BASH_REMATCH[1]}
  while [[ $s =~ ^[[:space:]]*\"([^\"]*)\"[[:space:]]*(,(.*))?$ ]]; do
    item=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[3]}
    echo "$item"
  done
  [[ $s =~ ^[[:space:]]*$ ]]
}

# umoci config flags for the Dockerfile's USER, ENTRYPOINT, CMD and LABELs.
dockerfile_config() {
  local stage line value version item
  stage=$(final_stage)
  version=${VERSION:-$(sed -n 's/^ARG VERSION=\(.*\)$/\1/p' <<<"$stage" | tail -n1)}
  [ -n "$version" ] || die "no ARG VERSION=... in the Dockerfile's final stage (or set VERSION)"
  value=$(sed -n 's/^USER[[:space:]]\{1,\}\(.*\)$/\1/p' <<<"$stage" | tail -n1)
  [ -n "$value" ] || die "no USER in the Dockerfile's final stage"
  echo "--config.user=$value"
  for instruction in ENTRYPOINT CMD; do
    line=$(sed -n "s/^$instruction[[:space:]]\{1,\}\(.*\)$/\1/p" <<<"$stage" | tail -n1)
    local items
    items=$(json_array "$line") || die "the Dockerfile's $instruction is not in exec form ([\"...\"]): $line"
    while IFS= read -r item; do
      echo "--config.${instruction,,}=$item"
    done <<<"$items"
  done
  line=$(grep '^LABEL ' <<<"$stage" | sed 's/^LABEL //') || die "no LABEL in the Dockerfile's final stage"
  while [[ $line =~ ^[[:space:]]*([^=[:space:]]+)=\"([^\"]*)\"(.*)$ ]]; do
    value=${BASH_REMATCH[2]//\$\{VERSION\}/$version}
    echo "--config.label=${BASH_REMATCH[1]}=$value"
    line=${BASH_REMATCH[3]}
  done
  [[ $line =~ ^[[:space:]]*$ ]] || die "cannot read the Dockerfile's LABEL from: $line"
}

musl_binary() {
  apt_install musl-tools umoci busybox-static binutils
  if ! rustc --print target-libdir --target "$MUSL" >/dev/null 2>&1 ||
    [ ! -d "$(rustc --print target-libdir --target "$MUSL")" ]; then
    command -v rustup >/dev/null || die "the Rust target $MUSL is missing and rustup is not there to add it"
    log "adding the Rust target $MUSL (rustup)"
    rustup target add "$MUSL" >&2
  fi
  # As the Dockerfile builds it: release, locked, without the `dev` feature; ring's C goes
  # through musl-gcc (Debian's musl-tools).
  log "building kubelock for $MUSL (release; cached in $TARGET_DIR)"
  (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --locked --no-default-features \
    --bin kubelock --target "$MUSL" >&2)
  BIN="$TARGET_DIR/$MUSL/release/kubelock"
  # The image has no dynamic loader: the binary must be static (the Dockerfile runs it too).
  ! readelf -l "$BIN" | grep -q 'Requesting program interpreter' || die "$BIN is dynamically linked"
  "$BIN" --version >/dev/null || die "$BIN --version failed"
  BUSYBOX=$(command -v busybox) || die "busybox not found: install busybox-static"
  ! readelf -l "$BUSYBOX" | grep -q 'Requesting program interpreter' ||
    die "$BUSYBOX is dynamically linked: install busybox-static (it replaces the busybox package)"
}

# Files of distroless/static-debian12 that matter at run time: users and groups (root,
# nobody, nonroot 65532), /tmp, the nonroot home, the CA bundle.
base_files() {
  local root=$1
  mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/home/nonroot"
  [ "$(id -u)" != 0 ] || chown 65532:65532 "$root/home/nonroot"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' >"$root/etc/group"
  [ ! -f /etc/ssl/certs/ca-certificates.crt ] || cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
}

cmd_build() {
  musl_binary
  local config=()
  mapfile -t config < <(dockerfile_config)
  [ ${#config[@]} -gt 0 ] || die "reading the Dockerfile's final stage failed"
  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/kubelock-image.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  mkdir -p "$IMAGE_DIR"

  local root="$work/kubelock"
  base_files "$root"
  install -D -m 0755 "$BIN" "$root/usr/local/bin/kubelock"
  find "$root" -exec touch -h -d @0 {} +
  bash "$NODE_SCRIPT" oci-image "$IMAGE_DIR/kubelock.oci.tar" "$IMAGE" "$root" "${config[@]}" \
    --config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --config.workingdir=/home/nonroot
  log "wrote $IMAGE_DIR/kubelock.oci.tar ($IMAGE)"

  root="$work/kubelock-test"
  base_files "$root"
  install -D -m 0755 "$BIN" "$root/usr/local/bin/kubelock"
  install -D -m 0755 "$BUSYBOX" "$root/bin/busybox"
  local applet
  for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  find "$root" -exec touch -h -d @0 {} +
  bash "$NODE_SCRIPT" oci-image "$IMAGE_DIR/kubelock-test.oci.tar" "$TEST_IMAGE" "$root" \
    --config.cmd=sh --config.env=PATH=/usr/local/bin:/bin --config.workingdir=/ \
    --config.label=org.opencontainers.image.title=kubelock-test \
    --config.label=org.opencontainers.image.description="busybox and kubelock, for kubelock's tests and examples"
  log "wrote $IMAGE_DIR/kubelock-test.oci.tar ($TEST_IMAGE)"
}

case "${1:-}" in
  build) cmd_build ;;
  load) bash "$NODE_SCRIPT" load "$IMAGE_DIR/kubelock.oci.tar" "$IMAGE_DIR/kubelock-test.oci.tar" ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
