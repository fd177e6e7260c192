#!/usr/bin/env bash
# A real, local Kubernetes control plane (etcd + kube-apiserver) for kubelock's
# tests, benchmarks and `kubelock dev`. No Docker, no kind: see README "Development".
#
#   src/devenv/control-plane.sh install          etcd from Debian; kube-apiserver from $KUBE_APISERVER,
#                                          the cache, or built from Debian's source (Go 1.15)
#   src/devenv/control-plane.sh path             print the kube-apiserver binary that will be used
#   src/devenv/control-plane.sh prepare DIR      certificates, identities, kubeconfigs, argument files
#   src/devenv/control-plane.sh run [DIR]        prepare and run in the foreground until SIGINT/SIGTERM
#   src/devenv/control-plane.sh up [DIR]         run in the background; prints the admin KUBECONFIG
#   src/devenv/control-plane.sh down DIR         stop what `up` started and remove DIR
#
# Options (environment):
#   KUBE_APISERVER   use this kube-apiserver binary (v1.20.x built with Go 1.15) instead of building
#   KUBELOCK_CACHE   cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/kubelock)
#   ETCD_DATA_ON_DISK=1   keep etcd's data in DIR (benchmarks) instead of /dev/shm (tests)
#   NODE_ADDRESS     `prepare` for a control plane with a local node (src/devenv/node.sh): the
#                    machine's own IPv4 address, which kube-apiserver listens on and advertises
#
# Every process started here gets the parent-death signal SIGKILL (setpriv --pdeathsig),
# so killing this script, even with SIGKILL, leaves no etcd or kube-apiserver behind.
set -euo pipefail

KUBE_VERSION=1.20.2
CACHE="${KUBELOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubelock}"
# Every Kubernetes binary built from one source tree with Go 1.15 (see build_kubernetes).
KUBE_BIN="$CACHE/kubernetes-v$KUBE_VERSION-go1.15"
KUBE_COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
CACHED_APISERVER="$KUBE_BIN/kube-apiserver"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# The Service range and the `kubernetes` Service's address in it.
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1

# How to name this script in hints (the Rust harness runs an embedded copy from a temp dir).
SELF="${KUBELOCK_SCRIPT_NAME:-$0}"

die() { echo "control-plane: error: $*" >&2; exit 1; }
log() { echo "control-plane: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $* (no sudo found)"; fi
}

# apt_install PKG... installs Debian packages that are missing.
apt_install() {
  local missing=()
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null ||
    die "apt-get not found: install ${missing[*]} yourself (etcd 3.4+, openssl, curl) and set KUBE_APISERVER"
  log "installing ${missing[*]} (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 ||
    { as_root apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; } ||
    die "apt-get install ${missing[*]} failed"
}

apiserver_path() {
  if [ -n "${KUBE_APISERVER:-}" ]; then
    [ -x "$KUBE_APISERVER" ] || die "KUBE_APISERVER=$KUBE_APISERVER is not an executable file"
    echo "$KUBE_APISERVER"
  elif [ -x "$CACHED_APISERVER" ]; then
    echo "$CACHED_APISERVER"
  else
    return 1
  fi
}

# A private apt configuration: lets us fetch sources and bullseye's Go 1.15 without
# touching the machine's own sources list (the system stays on its release).
private_apt() {
  local dir=$1; shift
  apt-get -q -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache" -o Debug::NoLocking=1 \
    -o APT::Sandbox::User=root "$@"
}

build_apiserver() {
  command -v apt-get >/dev/null ||
    die "apt-get not found: build kube-apiserver v$KUBE_VERSION with Go 1.15 yourself and set KUBE_APISERVER"
  [ -r "$KEYRING" ] || die "$KEYRING missing: install debian-archive-keyring or set KUBE_APISERVER"
  apt_install rsync make dpkg-dev
  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/kubelock-build.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src" "$work/go"
  local suite
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  cat >"$work/apt/sources.list" <<EOF
deb-src [signed-by=$KEYRING] $DEBIAN_MIRROR $suite main
deb [signed-by=$KEYRING] $DEBIAN_MIRROR bullseye main
EOF
  log "building kube-apiserver v$KUBE_VERSION from Debian's kubernetes source with Go 1.15 (about 7 minutes on 2 cores)"
  private_apt "$work/apt" update >&2 || die "apt-get update of the private source list failed (is $DEBIAN_MIRROR reachable?)"
  (cd "$work/src" && private_apt "$work/apt" source --download-only kubernetes >&2) ||
    die "could not download Debian's kubernetes source package"
  # Go 1.15: kube-apiserver 1.20 built with Go >= 1.18 crashes decoding custom resources
  # (vendored modern-go/reflect2 v1.0.1): seen here at the first create of a custom object.
  (cd "$work/go" && private_apt "$work/apt" download golang-1.15-go golang-1.15-src >&2) ||
    die "could not download golang-1.15-go from bullseye"
  for deb in "$work"/go/*.deb; do dpkg -x "$deb" "$work/go/root"; done
  local goroot="$work/go/root/usr/lib/go-1.15"
  tar -xzf "$work"/src/kubernetes_*.orig.tar.gz -C "$work/src"
  local tree
  tree=$(find "$work/src" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -n1)
  [ -n "$tree" ] || die "unpacked kubernetes source tree not found"
  (cd "$tree" && PATH="$goroot/bin:$PATH" GOROOT="$goroot" GOPATH="$tree/.go" GOFLAGS=-mod=vendor \
    CGO_ENABLED=0 make WHAT="$(for c in $KUBE_COMPONENTS; do printf 'cmd/%s ' "$c"; done)" >&2) ||
    die "kubernetes build failed"
  local staging="$KUBE_BIN.tmp"
  rm -rf "$staging"; mkdir -p "$staging"
  for c in $KUBE_COMPONENTS; do install -m 0755 "$tree/_output/bin/$c" "$staging/$c"; done
  # The pause container's source: the local node compiles its sandbox image from it.
  install -m 0644 "$tree/build/pause/linux/pause.c" "$staging/pause.c"
  rm -rf "$KUBE_BIN"; mv "$staging" "$KUBE_BIN"
  log "cached $KUBE_BIN"
}

cmd_install() {
  apt_install etcd-server openssl curl
  command -v etcd >/dev/null || die "etcd not on PATH after installing etcd-server"
  if apiserver_path >/dev/null; then
    log "kube-apiserver: $(apiserver_path)"
  else
    build_apiserver
  fi
}

# free_port [EXCLUDED...]: a port nobody listens on, not among EXCLUDED, and outside the
# kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range): outgoing connections take
# their local ports from that range, so one of them could take a port picked there between
# this check and the server's bind. A server that still loses a race is started again on new
# ports by the Rust harness.
free_port() {
  local lo=32768 hi=60999 first=20000 last=65535 below above total port n
  read -r lo hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  below=$(( lo > first ? (lo > last + 1 ? last + 1 : lo) - first : 0 ))
  above=$(( hi < last ? last - (hi < first ? first - 1 : hi) : 0 ))
  total=$((below + above))
  [ "$total" -gt 0 ] || die "the ephemeral port range $lo-$hi covers $first-$last: no port outside it to listen on"
  for _ in $(seq 1 200); do
    n=$(( ((RANDOM << 15) | RANDOM) % total ))
    if [ "$n" -lt "$below" ]; then port=$((first + n)); else port=$(( (hi < first ? first - 1 : hi) + 1 + n - below )); fi
    case " $* " in *" $port "*) continue ;; esac
    if command -v ss >/dev/null; then
      [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] || continue
    fi
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return 0; fi
  done
  die "no free port found outside the ephemeral range $lo-$hi"
}

# kubeconfig FILE USER TOKEN
write_kubeconfig() {
  local file=$1 user=$2 token=$3
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubelock-dev
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $DIR/pki/ca.crt
contexts:
- name: $user
  context: {cluster: kubelock-dev, user: $user, namespace: default}
current-context: $user
users:
- name: $user
  user: {token: $token}
EOF
  chmod 0600 "$file"
}

cmd_prepare() {
  DIR=$1
  [ -f "$DIR/apiserver.args" ] && return 0
  command -v openssl >/dev/null || die "openssl not found: run '$SELF install' first"
  command -v etcd >/dev/null || die "etcd not found: run '$SELF install' first"
  command -v setpriv >/dev/null || die "setpriv not found: install util-linux"
  local apiserver
  apiserver=$(apiserver_path) || die "no kube-apiserver: run '$SELF install' or set KUBE_APISERVER"
  mkdir -p "$DIR/pki"
  local pki="$DIR/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kubelock-dev-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  if [ -z "${NODE_ADDRESS:-}" ]; then
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >"$pki/san.ext"
  else
    # Pods reach the API server as the `kubernetes` Service (its ClusterIP, the first address of
    # the service range) or at the address it advertises.
    printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,%s\n' \
      "$SERVICE_IP" "$NODE_ADDRESS" 'DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local' >"$pki/san.ext"
  fi
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$pki/san.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  local mode_args=(--endpoint-reconciler-type=none --disable-admission-plugins=ServiceAccount)
  local bind=127.0.0.1 advertise=127.0.0.1 authz=RBAC
  if [ -n "${NODE_ADDRESS:-}" ]; then
    # The client certificate kube-apiserver shows the kubelet (logs, exec, port-forward).
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
      -keyout "$pki/kubelet-client.key" -out "$pki/kubelet-client.csr" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >"$pki/client.ext"
    openssl x509 -req -in "$pki/kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 -extfile "$pki/client.ext" -out "$pki/kubelet-client.crt" 2>/dev/null
    # Listens on every address (the kubeconfigs use 127.0.0.1, pods the advertised address
    # behind the `kubernetes` Service, whose Endpoints the lease reconciler keeps), authorizes
    # kubelets as nodes, and gives pods service-account tokens.
    bind=0.0.0.0 advertise=$NODE_ADDRESS authz=Node,RBAC
    mode_args=(--allow-privileged=true --enable-admission-plugins=NodeRestriction
      --kubelet-client-certificate="$pki/kubelet-client.crt" --kubelet-client-key="$pki/kubelet-client.key"
      --kubelet-preferred-address-types=InternalIP)
    echo "$NODE_ADDRESS" >"$DIR/node-address"
  fi

  # Static-token identities: distinct users so that RBAC is tested for real.
  # admin is cluster-admin; the others get no rights until a test binds them.
  : >"$DIR/tokens.csv"
  local who token
  for who in admin controller requester-1 requester-2; do
    token=$(openssl rand -hex 16)
    if [ "$who" = admin ]; then
      echo "$token,kubelock-admin,uid-admin,\"system:masters\"" >>"$DIR/tokens.csv"
    else
      echo "$token,kubelock-$who,uid-$who" >>"$DIR/tokens.csv"
    fi
    echo "$token" >"$DIR/token-$who"
  done
  chmod 0600 "$DIR"/token-* "$DIR/tokens.csv"

  ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port "$ETCD_PORT"); API_PORT=$(free_port "$ETCD_PORT" "$ETCD_PEER_PORT")
  local data="$DIR/etcd"
  if [ -z "${ETCD_DATA_ON_DISK:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
    data=$(mktemp -d /dev/shm/kubelock-etcd.XXXXXX)
    echo "$data" >"$DIR/etcd-data-shm"
  fi
  # One argument per line, read by `run` here and by the Rust harness (src/devenv/mod.rs).
  printf '%s\n' "$(command -v etcd)" --name=default --data-dir="$data" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="default=http://127.0.0.1:$ETCD_PEER_PORT" \
    --logger=zap --log-level=warn >"$DIR/etcd.args"
  printf '%s\n' "$apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --secure-port="$API_PORT" --insecure-port=0 --bind-address="$bind" --advertise-address="$advertise" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --token-auth-file="$DIR/tokens.csv" --authorization-mode="$authz" \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$pki/sa.key" \
    --service-account-signing-key-file="$pki/sa.key" --api-audiences=https://kubernetes.default.svc \
    --service-cluster-ip-range="$SERVICE_CIDR" "${mode_args[@]}" --profiling=false --v=0 >"$DIR/apiserver.args"
  echo "http://127.0.0.1:$ETCD_PORT" >"$DIR/etcd-endpoint"
  echo "https://127.0.0.1:$API_PORT" >"$DIR/server"
  for who in admin controller requester-1 requester-2; do
    write_kubeconfig "$DIR/kubeconfig-$who" "kubelock-$who" "$(cat "$DIR/token-$who")"
  done
  ln -sf kubeconfig-admin "$DIR/kubeconfig"
}

wait_ready() {
  local deadline=$((SECONDS + ${1:-90}))
  local server token
  server=$(cat "$DIR/server"); token=$(cat "$DIR/token-admin")
  until curl -fsS --max-time 2 --cacert "$DIR/pki/ca.crt" -H "Authorization: Bearer $token" \
      "$server/readyz" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "kube-apiserver not ready after ${1:-90}s; see $DIR/apiserver.log"
    kill -0 "$ETCD_PID" 2>/dev/null || die "etcd exited; see $DIR/etcd.log"
    kill -0 "$API_PID" 2>/dev/null || die "kube-apiserver exited; see $DIR/apiserver.log"
    sleep 0.2
  done
}

cleanup() {
  trap - EXIT INT TERM
  [ -n "${API_PID:-}" ] && kill "$API_PID" 2>/dev/null
  [ -n "${ETCD_PID:-}" ] && kill "$ETCD_PID" 2>/dev/null
  wait 2>/dev/null || true
  [ -f "$DIR/etcd-data-shm" ] && rm -rf "$(cat "$DIR/etcd-data-shm")"
  [ -n "${OWN_DIR:-}" ] && rm -rf "$DIR"
  log "stopped"
}

start_from_args() {
  local args=()
  mapfile -t args <"$1"
  setpriv --pdeathsig KILL -- "${args[@]}" >"$2" 2>&1 &
}

cmd_run() {
  DIR=${1:-}
  if [ -z "$DIR" ]; then DIR=$(mktemp -d "${TMPDIR:-/tmp}/kubelock-cp.XXXXXX"); OWN_DIR=1; fi
  mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
  cmd_prepare "$DIR"
  trap cleanup EXIT
  trap 'exit 0' INT TERM
  start_from_args "$DIR/etcd.args" "$DIR/etcd.log"; ETCD_PID=$!
  start_from_args "$DIR/apiserver.args" "$DIR/apiserver.log"; API_PID=$!
  echo $$ >"$DIR/pid"; echo "$ETCD_PID" >"$DIR/etcd.pid"; echo "$API_PID" >"$DIR/apiserver.pid"
  wait_ready 90
  touch "$DIR/ready"
  log "ready: export KUBECONFIG=$DIR/kubeconfig"
  # Stay in the foreground until told to stop or until either server dies.
  wait -n "$ETCD_PID" "$API_PID" || true
  die "a control-plane process exited; see $DIR/etcd.log and $DIR/apiserver.log"
}

cmd_up() {
  DIR=${1:-$(mktemp -d "${TMPDIR:-/tmp}/kubelock-cp.XXXXXX")}
  mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
  setsid "$0" run "$DIR" >"$DIR/control-plane.log" 2>&1 </dev/null &
  local deadline=$((SECONDS + 120))
  until [ -f "$DIR/ready" ]; do
    kill -0 $! 2>/dev/null || die "control plane failed to start; see $DIR/control-plane.log"
    [ $SECONDS -lt $deadline ] || die "control plane not ready after 120s; see $DIR/control-plane.log"
    sleep 0.2
  done
  echo "export KUBECONFIG=$DIR/kubeconfig"
}

cmd_down() {
  DIR=${1:?usage: $0 down DIR}
  [ -f "$DIR/pid" ] || die "$DIR/pid not found: nothing to stop"
  local pid
  pid=$(cat "$DIR/pid")
  kill "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { kill -9 "$pid" 2>/dev/null || true; break; }
    sleep 0.1
  done
  [ -f "$DIR/etcd-data-shm" ] && rm -rf "$(cat "$DIR/etcd-data-shm")"
  rm -rf "$DIR"
}

# src/devenv/node.sh sources this file for its helpers: dispatch only when run.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "${1:-}" in
  install) cmd_install ;;
  path) apiserver_path || die "no kube-apiserver yet: run '$SELF install'" ;;
  prepare) cmd_prepare "${2:?usage: $0 prepare DIR}" ;;
  run) cmd_run "${2:-}" ;;
  up) cmd_up "${2:-}" ;;
  down) cmd_down "${2:-}" ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
