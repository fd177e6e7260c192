#!/usr/bin/env bash
# The local node of kubelock's development control plane: containerd (with runc and a CNI
# bridge), kubelet, kube-controller-manager, kube-scheduler and kube-proxy beside the etcd and
# kube-apiserver of control-plane.sh, so that pods really run (docs/local-node.md). The Rust
# harness (src/devenv/) starts every process from the argument files written here; this script
# installs, checks, prepares and cleans up.
#
#   src/devenv/node.sh install        Debian packages the node needs, and the Kubernetes binaries
#   src/devenv/node.sh preflight      can this machine run the node? prints its IPv4 address
#   src/devenv/node.sh prepare DIR    configuration and argument files of the node in DIR, a state
#                                     directory `control-plane.sh prepare DIR` filled with NODE_ADDRESS set
#   src/devenv/node.sh cleanup DIR    remove what the node of DIR left behind (idempotent)
#   src/devenv/node.sh oci-image OUT REF ROOTFS [umoci config flags...]
#                                     write the directory ROOTFS as an OCI image tarball named REF
#   src/devenv/node.sh load TAR...    import image tarballs into the running local node's containerd
#
# One node per machine: its bridge, the kubelet's port, its pod subnet, its cgroups and the
# KUBE-* iptables chains are machine-wide. While a node runs, its owner holds a lock on
# $NODE_LOCK (and the owner's reaper holds it until the node is cleaned up), which also names
# the node's state directory.
#
# Cleanup acts only on what the run recorded: the processes in DIR's pid files, the containers
# in its own runc root, the shims serving its own containerd socket, the mounts under DIR, the
# bridge, chains and sysctls noted at prepare time, the logs of the pods its kubelet ran.
# Containers and their shims outlive containerd by design, so this runs after every stop,
# also from the reaper when the owner was killed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Helpers (die, log, apt_install, free_port, write_kubeconfig, apiserver_path, build_apiserver)
# and the cache and Service range settings.
KUBELOCK_SCRIPT_NAME="${KUBELOCK_CONTROL_PLANE_SCRIPT_NAME:-$HERE/control-plane.sh}" . "$HERE/control-plane.sh"
NODE_SELF="${KUBELOCK_NODE_SCRIPT_NAME:-$0}"
die() { echo "node: error: $*" >&2; exit 1; }
log() { echo "node: $*" >&2; }
# runc, ip, iptables and the like live in sbin, which a non-login environment may leave out.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

NODE_LOCK=/run/kubelock/node.lock
NODE_NAME=kubelock-node
BRIDGE=kubelock0
CNI_NETWORK=kubelock-pods
# Pod addresses: on the bridge only (no masquerade, no default route in pods), so pod traffic
# never leaves the machine.
POD_SUBNET=10.244.0.0/16
KUBELET_PORT=10250
# Where containerd puts the containers' cgroups in every hierarchy (its namespace of the CRI):
# without the QoS hierarchy the kubelet names no parent.
CGROUP_PARENT=k8s.io
# Built here from the Kubernetes tree's pause.c; "localhost/" so that nothing ever tries to
# pull it from a registry.
PAUSE_IMAGE=localhost/kubelock/pause:v$KUBE_VERSION
NODE_COMPONENTS="kubelet kube-controller-manager kube-scheduler kube-proxy"
# Sysctls that the node's processes change: the bridge plugin turns on forwarding, the kubelet
# sets its kernel tunables, kube-proxy may set route_localnet. Restored at cleanup.
SYSCTLS="net/ipv4/ip_forward net/ipv4/conf/all/route_localnet vm/overcommit_memory vm/panic_on_oom
  kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes"
# Machine-wide directories the node's processes write to; removed at cleanup if this run
# created them and they are empty again.
HOST_DIRS="/var/log/pods /var/log/containers /var/lib/cni/results /var/lib/cni /run/containerd/s /run/containerd"

# The directory holding kubelet, kube-controller-manager, kube-scheduler, kube-proxy and
# pause.c: beside the kube-apiserver in use.
node_bin_dir() {
  local apiserver
  apiserver=$(apiserver_path) || return 1
  dirname "$apiserver"
}

cmd_install() {
  apt_install containerd runc containernetworking-plugins iptables iproute2 util-linux busybox-static \
    gcc libc6-dev umoci
  local dir missing=()
  if dir=$(node_bin_dir); then
    for c in $NODE_COMPONENTS pause.c; do [ -e "$dir/$c" ] || missing+=("$c"); done
  else
    missing=(kube-apiserver)
  fi
  [ ${#missing[@]} -eq 0 ] && { log "Kubernetes binaries: $dir"; return 0; }
  [ -z "${KUBE_APISERVER:-}" ] ||
    die "KUBE_APISERVER=$KUBE_APISERVER: ${missing[*]} missing beside it (the node takes them from its directory)"
  build_apiserver
}

# --- Checks -------------------------------------------------------------------------------

ip2int() { local IFS=.; set -- $1; echo $(( ($1 << 24) | ($2 << 16) | ($3 << 8) | $4 )); }

# cidr_overlap A/N B/M: the two networks share an address.
cidr_overlap() {
  local a=${1%/*} n=${1#*/} b=${2%/*} m=${2#*/}
  [ "$n" = "$1" ] && n=32
  [ "$m" = "$2" ] && m=32
  local p=$(( n < m ? n : m )) mask
  mask=$(( p == 0 ? 0 : (0xffffffff << (32 - p)) & 0xffffffff ))
  [ $(( $(ip2int "$a") & mask )) -eq $(( $(ip2int "$b") & mask )) ]
}

# The machine's own IPv4 address: NODE_ADDRESS if set, else the address of the interface of the
# default route, else the first global address.
machine_address() {
  if [ -n "${NODE_ADDRESS:-}" ]; then echo "$NODE_ADDRESS"; return; fi
  local dev addr=""
  dev=$(ip -4 route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
  [ -z "$dev" ] || addr=$(ip -4 -o addr show dev "$dev" scope global | awk '{split($4, a, "/"); print a[1]; exit}')
  [ -n "$addr" ] || addr=$(ip -4 -o addr show scope global | awk -v b="$BRIDGE" '$2 != b {split($4, a, "/"); print a[1]; exit}')
  echo "$addr"
}

# Capabilities a rootful runc needs to create containers with the default capability set.
REQUIRED_CAPS="0:CAP_CHOWN 1:CAP_DAC_OVERRIDE 3:CAP_FOWNER 4:CAP_FSETID 5:CAP_KILL 6:CAP_SETGID 7:CAP_SETUID
  8:CAP_SETPCAP 10:CAP_NET_BIND_SERVICE 12:CAP_NET_ADMIN 13:CAP_NET_RAW 18:CAP_SYS_CHROOT 21:CAP_SYS_ADMIN
  27:CAP_MKNOD 29:CAP_AUDIT_WRITE 31:CAP_SETFCAP"

cmd_preflight() {
  local problems=()
  [ "$(id -u)" = 0 ] || die "the local node needs root (containerd, runc, mounts, a bridge, iptables): run as root"

  local c missing=()
  for c in containerd ctr runc containerd-shim-runc-v2 iptables iptables-save iptables-restore ip6tables \
    ip6tables-save ip6tables-restore ip ss mount umount flock umoci; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  for c in bridge host-local loopback; do [ -x "/usr/lib/cni/$c" ] || missing+=("/usr/lib/cni/$c"); done
  [ -x "$CACHE/pause-v$KUBE_VERSION/pause" ] || command -v gcc >/dev/null || missing+=(gcc)
  [ ${#missing[@]} -eq 0 ] || problems+=("missing ${missing[*]}: run '$NODE_SELF install'")
  local dir
  if dir=$(node_bin_dir); then
    missing=()
    for c in $NODE_COMPONENTS; do [ -x "$dir/$c" ] || missing+=("$dir/$c"); done
    [ -f "$dir/pause.c" ] || [ -x "$CACHE/pause-v$KUBE_VERSION/pause" ] || missing+=("$dir/pause.c")
    [ ${#missing[@]} -eq 0 ] || problems+=("missing ${missing[*]}: run '$NODE_SELF install' (builds them with kube-apiserver)")
  else
    problems+=("no kube-apiserver (nor the node's binaries beside it): run '$NODE_SELF install'")
  fi

  local capeff bit name lacking=()
  capeff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
  for c in $REQUIRED_CAPS; do
    bit=${c%%:*} name=${c#*:}
    [ $(( (0x$capeff >> bit) & 1 )) = 1 ] || lacking+=("$name")
  done
  [ ${#lacking[@]} -eq 0 ] || problems+=("capabilities missing from this process (CapEff $capeff): ${lacking[*]}")

  local controllers=" " ctl
  controllers+=$(awk '$3 == "cgroup" {print $4}' /proc/mounts | tr ',' ' ' | tr '\n' ' ')
  missing=()
  for ctl in cpu cpuacct cpuset memory devices freezer pids; do
    case "$controllers" in *" $ctl "*) ;; *) missing+=("$ctl") ;; esac
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if awk '$2 == "/sys/fs/cgroup" && $3 == "cgroup2"' /proc/mounts | grep -q .; then
      problems+=("cgroups: only the unified (v2) hierarchy is mounted; kubelet 1.20 needs the v1 controllers ${missing[*]}")
    else
      problems+=("cgroups: v1 controllers not mounted: ${missing[*]}")
    fi
  fi
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || grep -qw overlay /proc/filesystems ||
    problems+=("the kernel has no overlay filesystem (containerd's snapshotter needs it)")
  [ -e /dev/kmsg ] || problems+=("/dev/kmsg missing (the kubelet's OOM watcher reads it)")

  local listener
  listener=$(ss -Hltnp "sport = :$KUBELET_PORT" 2>/dev/null || true)
  [ -z "$listener" ] || problems+=("port $KUBELET_PORT (the kubelet's) is taken: $listener")
  ! ip link show "$BRIDGE" >/dev/null 2>&1 ||
    problems+=("network interface $BRIDGE exists: another local node runs, or one was not cleaned up ('ip link delete $BRIDGE' removes it)")
  local chains
  chains=$( { iptables-save 2>/dev/null; ip6tables-save 2>/dev/null; } | awk '/^:KUBE-/ {print substr($1, 2)}' | sort -u | tr '\n' ' ')
  [ -z "$chains" ] ||
    problems+=("iptables has KUBE-* chains ($chains): another Kubernetes node runs on this machine, or one was not cleaned up")
  iptables-save -t nat >/dev/null 2>&1 || problems+=("iptables cannot read the nat table: $(iptables-save -t nat 2>&1 | head -n1)")

  local addr
  addr=$(machine_address)
  if [ -z "$addr" ]; then
    problems+=("no IPv4 address besides loopback: pods reach the API server at the machine's own address (set NODE_ADDRESS)")
  else
    ip -4 -o addr show | awk '{split($4, a, "/"); print a[1]}' | grep -qxF "$addr" ||
      problems+=("NODE_ADDRESS=$addr is not an address of this machine")
  fi
  local net
  for net in $(ip -4 -o route show | awk '$1 != "default" {print $1}') $(ip -4 -o addr show | awk '{print $4}'); do
    case $net in 127.*) continue ;; esac
    if cidr_overlap "$net" "$POD_SUBNET" || cidr_overlap "$net" "$SERVICE_CIDR"; then
      problems+=("$net (a route or address of this machine) overlaps the pod subnet $POD_SUBNET or the Service range $SERVICE_CIDR")
    fi
  done

  if [ ${#problems[@]} -gt 0 ]; then
    printf 'node: error: this machine cannot run the local node:\n' >&2
    printf '  - %s\n' "${problems[@]}" >&2
    exit 1
  fi
  echo "$addr"
}

# --- Prepare ------------------------------------------------------------------------------

cgroup_mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" {print $2}' /proc/mounts; }

# What cleanup must know about the machine before the node touches it.
record_host() {
  local r=$1 k ipt t d
  mkdir -p "$r"
  for k in $SYSCTLS; do [ -r "/proc/sys/$k" ] && echo "$k $(cat "/proc/sys/$k")"; done >"$r/sysctl"
  # KUBE-* chains that exist already (preflight refuses to start when there are any; recorded
  # anyway, so that cleanup never removes a chain this run did not create).
  for ipt in iptables ip6tables; do
    for t in filter nat mangle raw; do
      "$ipt-save" -t "$t" 2>/dev/null | awk -v i="$ipt" -v t="$t" '/^:KUBE-/ {print i, t, substr($1, 2)}' || true
    done
  done >"$r/chains"
  for d in $HOST_DIRS $(cgroup_mounts | sed "s#\$#/$CGROUP_PARENT#"); do [ ! -e "$d" ] || echo "$d"; done >"$r/existed"
  echo "$BRIDGE" >"$r/bridge"
}

# OCI image tarball of a directory, written with umoci (Debian package): it edits an OCI image
# layout in place, without a daemon, a storage driver, a base image or a registry. buildah
# needs containers-storage and a configured storage driver even for `from scratch`, and
# skopeo only copies images that exist.
#   oci_image OUT REF ROOTFS [umoci config flags...]
cmd_oci_image() {
  local out=$1 ref=$2 rootfs=$3
  shift 3
  command -v umoci >/dev/null || die "umoci not found: run '$NODE_SELF install' (Debian package umoci)"
  [ -d "$rootfs" ] || die "oci-image: $rootfs is not a directory"
  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/kubelock-oci.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  local image="$work/layout:$ref" epoch=1970-01-01T00:00:00Z rootless=()
  # Without root, files are recorded as root's (umoci cannot read what it cannot chown).
  [ "$(id -u)" = 0 ] || rootless=(--rootless)
  # Fixed timestamps: the same files give the same image digest, and importing it again is a no-op.
  umoci init --layout "$work/layout"
  umoci new --image "$image"
  umoci insert "${rootless[@]}" --image "$image" --history.created="$epoch" --history.created_by="kubelock oci-image $ref" "$rootfs" /
  umoci config --image "$image" --created="$epoch" --no-history "$@"
  umoci gc --layout "$work/layout"
  mkdir -p "$(dirname "$out")"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/layout" -cf "$out.tmp" .
  mv "$out.tmp" "$out"
}

# The pause image (the pods' sandbox): pause.c from the Kubernetes tree, compiled static, built
# once into the cache. Prints the tarball.
pause_image() {
  local cache="$CACHE/pause-v$KUBE_VERSION"
  if [ ! -f "$cache/pause.oci.tar" ]; then
    local dir work
    dir=$(node_bin_dir) || die "no kube-apiserver (nor pause.c beside it): run '$NODE_SELF install'"
    [ -f "$dir/pause.c" ] || die "$dir/pause.c missing: run '$NODE_SELF install'"
    command -v gcc >/dev/null || die "gcc not found: run '$NODE_SELF install'"
    mkdir -p "$CACHE"
    work=$(mktemp -d "$CACHE/pause.XXXXXX")
    mkdir -p "$work/rootfs"
    gcc -Os -static -DVERSION="v$KUBE_VERSION" -o "$work/rootfs/pause" "$dir/pause.c" >&2 ||
      { rm -rf "$work"; die "compiling $dir/pause.c (static) failed: is libc6-dev installed?"; }
    strip "$work/rootfs/pause" 2>/dev/null || true
    touch -d @0 "$work/rootfs/pause" "$work/rootfs"
    cmd_oci_image "$work/pause.oci.tar" "$PAUSE_IMAGE" "$work/rootfs" --config.entrypoint=/pause
    cp "$work/rootfs/pause" "$work/pause"
    rm -rf "$work/rootfs" "$cache"
    mv "$work" "$cache"
  fi
  echo "$cache/pause.oci.tar"
}

cmd_prepare() {
  DIR=$1
  [ -f "$DIR/apiserver.args" ] || die "$DIR is not prepared: run '$KUBELOCK_SCRIPT_NAME prepare $DIR' with NODE_ADDRESS set first"
  [ -f "$DIR/node-address" ] || die "$DIR was prepared without NODE_ADDRESS (for a control plane without a node)"
  [ -f "$DIR/kubelet.args" ] && return 0
  local addr bin N="$DIR/node" pki="$DIR/pki"
  addr=$(cat "$DIR/node-address")
  bin=$(node_bin_dir) || die "no kube-apiserver: run '$NODE_SELF install'"
  local ctr="$N/containerd"
  local sock="$ctr/containerd.sock"
  mkdir -p "$N" "$ctr/root" "$ctr/state" "$ctr/runc" "$ctr/opt" "$N/cni/net.d" "$N/kubelet/pki" \
    "$N/kubelet/volume-plugins" "$N/controller-manager" "$N/scheduler"
  record_host "$N/record"

  # Identities of the node's components (static tokens), with the names Kubernetes' bootstrap
  # RBAC policy binds: the kubelet is a node for the Node authorizer.
  API_PORT=$(sed 's#.*:##' "$DIR/server")
  local who user groups token
  for who in node controller-manager scheduler proxy; do
    case $who in
      node) user=system:node:$NODE_NAME groups=system:nodes ;;
      proxy) user=system:kube-proxy groups="" ;;
      *) user=system:kube-$who groups="" ;;
    esac
    token=$(openssl rand -hex 16)
    echo "$token,$user,uid-$who${groups:+,\"$groups\"}" >>"$DIR/tokens.csv"
    write_kubeconfig "$N/kubeconfig-$who" "kubelock-$who" "$token"
  done

  local used ports=() p
  used=$(grep -ho ':[0-9]\{4,5\}' "$DIR/etcd.args" "$DIR/server" | tr -d : | sort -u | tr '\n' ' ')
  for _ in 1 2 3 4 5; do
    p=$(free_port $used "${ports[@]}")
    ports+=("$p")
  done
  local cm_port=${ports[0]} sched_port=${ports[1]} healthz_port=${ports[2]} proxy_metrics=${ports[3]} proxy_healthz=${ports[4]}

  cat >"$ctr/config.toml" <<EOF
# containerd of the local node: its own root, state, socket and runc root, nothing of the
# machine's own containerd (if any).
version = 2
root = "$ctr/root"
state = "$ctr/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$ctr/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  disable_apparmor = true
  # Without CAP_SYS_RESOURCE in the capability bounding set, even root cannot lower an
  # oom_score_adj, and runc fails every sandbox (the pause container asks for -998) with
  # "can't get final child's PID from pipe: EOF". This clamps containers to containerd's own.
  restrict_oom_score_adj = true
  # The pods' network namespaces under the state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        # runc's state of this node's containers (cleanup finds them there).
        Root = "$ctr/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$N/cni/net.d"
    max_conf_num = 1
EOF
  # Routes in the pods: the pod subnet, the Service range and the machine's address (where
  # the `kubernetes` Service leads), and no default route.
  cat >"$N/cni/net.d/10-$CNI_NETWORK.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_SUBNET"}]],
        "routes": [{"dst": "$POD_SUBNET"}, {"dst": "$SERVICE_CIDR"}, {"dst": "$addr/32"}],
        "dataDir": "$N/cni/ipam"
      }
    }
  ]
}
EOF
  cat >"$N/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $addr
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
# No QoS cgroup hierarchy and no node allocatable enforcement: containerd puts the pods'
# containers in /$CGROUP_PARENT/<id> of each cgroup hierarchy (cgroupfs driver, no systemd).
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
runtimeRequestTimeout: 2m
# Images are imported, not pulled: never garbage-collect them, and evict only when almost full.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
# No KUBE-FIREWALL and KUBE-MARK-* chains of the kubelet's (one drops packets to 127.0.0.0/8
# that do not come from loopback, and they outlive it); kube-proxy makes what it needs.
makeIPTablesUtilChains: false
EOF

  local kc="$N/kubeconfig"
  printf '%s\n' "$(command -v containerd)" --config="$ctr/config.toml" >"$DIR/containerd.args"
  printf '%s\n' "$bin/kube-controller-manager" --kubeconfig="$kc-controller-manager" \
    --authentication-kubeconfig="$kc-controller-manager" --authorization-kubeconfig="$kc-controller-manager" \
    --bind-address=127.0.0.1 --secure-port="$cm_port" --port=0 --cert-dir="$N/controller-manager" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --controllers='*' --v=1 >"$DIR/controller-manager.args"
  printf '%s\n' "$bin/kube-scheduler" --kubeconfig="$kc-scheduler" \
    --authentication-kubeconfig="$kc-scheduler" --authorization-kubeconfig="$kc-scheduler" \
    --bind-address=127.0.0.1 --secure-port="$sched_port" --port=0 --cert-dir="$N/scheduler" \
    --leader-elect=false --v=1 >"$DIR/scheduler.args"
  printf '%s\n' "$bin/kubelet" --config="$N/kubelet-config.yaml" --kubeconfig="$kc-node" \
    --container-runtime=remote --container-runtime-endpoint="unix://$sock" \
    --pod-infra-container-image="$PAUSE_IMAGE" --root-dir="$N/kubelet" --cert-dir="$N/kubelet/pki" \
    --volume-plugin-dir="$N/kubelet/volume-plugins" --hostname-override="$NODE_NAME" --node-ip="$addr" \
    --v=1 >"$DIR/kubelet.args"
  # iptables mode; node ports on the machine's address only, and no conntrack tuning (a
  # machine-wide setting). It turns on route_localnet anyway, which cleanup restores.
  printf '%s\n' "$bin/kube-proxy" --kubeconfig="$kc-proxy" --proxy-mode=iptables \
    --cluster-cidr="$POD_SUBNET" --hostname-override="$NODE_NAME" --bind-address="$addr" \
    --nodeport-addresses="$addr/32" --metrics-bind-address="127.0.0.1:$proxy_metrics" \
    --healthz-bind-address="127.0.0.1:$proxy_healthz" --conntrack-max-per-core=0 \
    --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 --oom-score-adj=0 \
    --v=1 >"$DIR/kube-proxy.args"

  pause_image >"$N/pause-image"
  echo "$PAUSE_IMAGE" >"$N/pause-image-name"
  echo "$NODE_NAME" >"$DIR/node-name"
  echo "$sock" >"$DIR/containerd-socket"
  echo "$POD_SUBNET" >"$DIR/pod-subnet"
}

# --- Cleanup ------------------------------------------------------------------------------

warn() { echo "node cleanup: $*" >&2; }

# kill_recorded NAME: SIGKILL the process in DIR/NAME.pid if it still runs the program of
# DIR/NAME.args, and wait until it is gone.
kill_recorded() {
  local name=$1 pid program exe
  [ -f "$DIR/$name.pid" ] && [ -f "$DIR/$name.args" ] || return 0
  pid=$(cat "$DIR/$name.pid")
  program=$(head -n1 "$DIR/$name.args")
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  [ -n "$exe" ] && [ "$exe" = "$(readlink -f "$program")" ] || return 0
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 100); do [ -e "/proc/$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$exe" ] || return 0; sleep 0.05; done
  warn "$name (pid $pid) survived SIGKILL"
}

# Containers in this node's runc root: killed (every process of their cgroups) and deleted.
remove_containers() {
  local root="$N/containerd/runc/k8s.io" id
  [ -d "$root" ] || return 0
  for id in $(ls "$root"); do
    runc --root "$root" delete --force "$id" >/dev/null 2>&1 || runc --root "$root" delete --force "$id" ||
      warn "runc delete $id failed"
  done
}

# The shims that serve this node's containerd socket (`containerd-shim-runc-v2 ... -address
# <socket>`), and the sockets they listen on (named in each task's bundle).
stop_shims() {
  local sock="$N/containerd/containerd.sock" proc pid args i bundle address
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    mapfile -d '' -t args <"$proc/cmdline" 2>/dev/null || continue
    [ ${#args[@]} -gt 2 ] || continue
    case ${args[0]##*/} in containerd-shim*) ;; *) continue ;; esac
    for ((i = 1; i < ${#args[@]} - 1; i++)); do
      if [ "${args[i]}" = -address ] && [ "${args[i + 1]}" = "$sock" ]; then
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
    done
  done
  for bundle in "$N/containerd/state/io.containerd.runtime.v2.task/k8s.io"/*/; do
    [ -f "$bundle/address" ] || continue
    address=$(sed 's#^unix://##' "$bundle/address")
    case $address in /run/containerd/s/*) rm -f "$address" ;; esac
  done
}

# Every mount under DIR (sandbox shm, network namespaces, container root filesystems, the
# kubelet's volumes and its root directory's bind mount), deepest first.
unmount_all() {
  local round m left
  for round in 1 2 3 4 5 6; do
    mapfile -t left < <(awk -v d="$DIR/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r)
    [ ${#left[@]} -gt 0 ] || return 0
    for m in "${left[@]}"; do
      m=$(printf '%b' "$m") # /proc/mounts escapes spaces and the like in octal
      if [ "$round" -lt 3 ]; then umount "$m" 2>/dev/null || true; else umount -l "$m" 2>/dev/null || true; fi
    done
  done
  awk -v d="$DIR/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | grep -q . && warn "still mounted under $DIR"
  return 0
}

remove_network() {
  local bridge veth
  [ -f "$N/record/bridge" ] || return 0
  bridge=$(cat "$N/record/bridge")
  ip link show "$bridge" >/dev/null 2>&1 || return 0
  # Pods' interfaces still plugged into it (their namespaces should be gone with the mounts).
  for veth in $(ip -o link show master "$bridge" 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}'); do
    ip link delete "$veth" 2>/dev/null || true
  done
  ip link delete "$bridge" 2>/dev/null || warn "could not delete $bridge"
}

# KUBE-* chains that were not there at prepare time, and the rules elsewhere that jump to them.
remove_chains() {
  local ipt t dump ours recorded
  [ -f "$N/record/chains" ] || return 0
  for ipt in iptables ip6tables; do
    command -v "$ipt-save" >/dev/null || continue
    for t in filter nat mangle raw; do
      dump=$("$ipt-save" -t "$t" 2>/dev/null) || continue
      recorded=$(awk -v i="$ipt" -v t="$t" '$1 == i && $2 == t {print $3}' "$N/record/chains")
      ours=$(awk '/^:KUBE-/ {print substr($1, 2)}' <<<"$dump" | grep -vxF -e "${recorded:-//none//}" || true)
      [ -n "$ours" ] || continue
      local script
      script=$(
        echo "*$t"
        awk -v ours="$(echo $ours)" '
          BEGIN { n = split(ours, a, " "); for (i = 1; i <= n; i++) o[a[i]] = 1 }
          /^-A / { t = ""; for (i = 3; i < NF; i++) if ($i == "-j" || $i == "-g") t = $(i + 1)
                   if (!($2 in o) && (t in o)) { sub(/^-A /, "-D "); print } }' <<<"$dump"
        for c in $ours; do echo "-F $c"; done
        for c in $ours; do echo "-X $c"; done
        echo COMMIT
      )
      "$ipt-restore" --noflush <<<"$script" 2>/dev/null || {
        # One rule or chain at a time, so that one failure does not keep the rest.
        grep '^-' <<<"$script" | while read -r rule; do eval "$ipt -t $t $rule" 2>/dev/null || true; done
      }
      "$ipt-save" -t "$t" 2>/dev/null | awk '/^:KUBE-/ {print substr($1, 2)}' | grep -xF -e "$ours" | grep -q . &&
        warn "$ipt $t: could not remove all of $(echo $ours)"
    done
  done
}

restore_sysctls() {
  local key value now
  [ -f "$N/record/sysctl" ] || return 0
  while read -r key value; do
    now=$(cat "/proc/sys/$key" 2>/dev/null) || continue
    [ "$now" = "$value" ] || echo "$value" >"/proc/sys/$key" 2>/dev/null || warn "could not restore $key to $value"
  done <"$N/record/sysctl"
}

# Logs of the pods this kubelet ran (it keeps them in /var/log/pods/<ns>_<name>_<uid>, with
# symlinks in /var/log/containers), and its CNI results cache of this network.
remove_host_files() {
  local uid d link target
  if [ -d "$N/kubelet/pods" ]; then
    for uid in $(ls "$N/kubelet/pods"); do
      for d in /var/log/pods/*_"$uid"; do [ -d "$d" ] && rm -rf -- "$d"; done
    done
  fi
  for link in /var/log/containers/*.log; do
    [ -L "$link" ] || continue
    target=$(readlink "$link")
    case $target in /var/log/pods/*) [ -e "$target" ] || rm -f -- "$link" ;; esac
  done
  # libcni's cache of each sandbox's network results (its loopback and this network).
  for d in "$N/containerd/root/io.containerd.grpc.v1.cri/sandboxes"/*/; do
    [ -d "$d" ] || continue
    d=${d%/}
    rm -f /var/lib/cni/results/*-"${d##*/}"-* 2>/dev/null || true
  done
}

# The containers' cgroups (runc deletes those it knows of), then their parents if this run
# created them.
remove_cgroups() {
  local mount id
  for mount in $(cgroup_mounts); do
    for id in $(ls "$N/containerd/state/io.containerd.runtime.v2.task/k8s.io" 2>/dev/null); do
      [ ! -d "$mount/$CGROUP_PARENT/$id" ] || rmdir "$mount/$CGROUP_PARENT/$id" 2>/dev/null ||
        warn "cgroup $mount/$CGROUP_PARENT/$id still in use"
    done
  done
}

# Machine-wide directories this run created, if they are empty again.
remove_host_dirs() {
  local d
  [ -f "$N/record/existed" ] || return 0
  for d in $HOST_DIRS $(cgroup_mounts | sed "s#\$#/$CGROUP_PARENT#"); do
    grep -qxF "$d" "$N/record/existed" || rmdir "$d" 2>/dev/null || true
  done
}

cmd_cleanup() {
  DIR=${1:?usage: $0 cleanup DIR}
  N="$DIR/node"
  [ -d "$N" ] || return 0
  local name
  for name in kube-proxy kubelet scheduler controller-manager containerd; do kill_recorded "$name"; done
  remove_containers
  stop_shims
  unmount_all
  remove_network
  remove_chains
  restore_sysctls
  remove_host_files
  remove_cgroups
  remove_host_dirs
}

# --- Images -------------------------------------------------------------------------------

cmd_load() {
  [ $# -gt 0 ] || die "usage: $NODE_SELF load TAR..."
  local holder dir sock tar
  [ -e "$NODE_LOCK" ] && ! flock -n "$NODE_LOCK" true 2>/dev/null ||
    die "no local node is running (start one with 'kubelock dev --node')"
  read -r holder dir <"$NODE_LOCK" || true
  sock="$dir/node/containerd/containerd.sock"
  [ -S "$sock" ] || die "the local node of $dir (owner pid $holder) has no containerd socket at $sock yet"
  for tar in "$@"; do
    [ -f "$tar" ] || die "$tar not found: run 'make image'"
    ctr --address "$sock" -n k8s.io images import "$tar" >&2 || die "importing $tar into $sock failed"
  done
}

case "${1:-}" in
  install) cmd_install ;;
  preflight) cmd_preflight ;;
  prepare) cmd_prepare "${2:?usage: $0 prepare DIR}" ;;
  cleanup) cmd_cleanup "${2:-}" ;;
  oci-image) shift; [ $# -ge 3 ] || die "usage: $NODE_SELF oci-image OUT REF ROOTFS [umoci config flags...]"; cmd_oci_image "$@" ;;
  pause-image) pause_image ;;
  load) shift; cmd_load "$@" ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
