#!/usr/bin/env bash
# Builds what a real node runs besides the kubelet and kube-proxy (those are in the control
# plane's multi-call binary, e2e/cluster): containerd v2 with its runc shim and ctr, runc, the
# local OCI registry (CNCF distribution), crane (images without a Docker daemon) and the pause
# program. Debian's CNI plugins and iptables are installed as packages when missing.
#
# The binaries land in $GANTRY_CACHE/node-bins/<key> (see ../cached-build.sh); the key hashes
# this script, the Go module, our sources and the Go toolchain.
#
#   build.sh               build if needed, print the directory
#   build.sh --print-dir   only print the directory the binaries belong in
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../cached-build.sh
source "$here/../cached-build.sh"

# The packages a node needs from Debian: CNI plugins (bridge, host-local, loopback, portmap),
# iptables (kube-proxy's and the bridge plugin's masquerading) and libseccomp's headers and
# static library (runc's seccomp filters, which the restricted Pod Security profile asks for).
debian_packages=(containernetworking-plugins iptables libseccomp-dev)

install_packages() {
	local missing=()
	for p in "${debian_packages[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[[ ${#missing[@]} -eq 0 ]] && return 0
	if [[ $(id -u) -ne 0 ]]; then
		echo "node-bins: Debian packages ${missing[*]} are missing; install them as root (apt-get install ${missing[*]})" >&2
		exit 1
	fi
	echo "node-bins: installing Debian packages ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
		{ apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
}

out=$(cache_dir node-bins "$here/build.sh" "$here/go.mod" "$here/go.sum" "$here/tools.go" \
	"$here/registry/main.go" "$here/pause/main.go")
if [[ ${1:-} == --print-dir ]]; then
	echo "$out"
	exit 0
fi

build_node_bins() {
	local tmp=$1
	version() { awk -v m="$1" '$1 == m { print $2 }' "$here/go.mod"; }
	containerd_version=$(version github.com/containerd/containerd/v2)
	runc_version=$(version github.com/opencontainers/runc)

	echo "node-bins: building containerd $containerd_version, runc $runc_version, registry, crane and pause into $out" >&2
	cd "$here"
	build() { "$go" build -mod=readonly -trimpath "$@"; }
	# Pure Go, static. With cgo off containerd has no btrfs snapshotter (it needs libbtrfs);
	# overlayfs is the one a node here uses.
	export CGO_ENABLED=0
	ctrd=github.com/containerd/containerd/v2
	build -tags urfave_cli_no_docs,no_zfs,no_devmapper \
		-ldflags="-s -w -X $ctrd/version.Version=$containerd_version" -o "$tmp/containerd" $ctrd/cmd/containerd
	build -tags urfave_cli_no_docs,no_grpc \
		-ldflags="-s -w -X $ctrd/version.Version=$containerd_version" -o "$tmp/containerd-shim-runc-v2" $ctrd/cmd/containerd-shim-runc-v2
	build -tags urfave_cli_no_docs \
		-ldflags="-s -w -X $ctrd/version.Version=$containerd_version" -o "$tmp/ctr" $ctrd/cmd/ctr
	build -ldflags="-s -w" -o "$tmp/registry" ./registry
	build -ldflags="-s -w" -o "$tmp/pause" ./pause
	build -ldflags="-s -w" -o "$tmp/crane" github.com/google/go-containerregistry/cmd/crane
	# runc needs cgo (its namespace-entering C code); linked statically with libseccomp so
	# that it runs wherever the cache is.
	CGO_ENABLED=1 build -tags "seccomp netgo osusergo urfave_cli_no_docs" \
		-ldflags="-s -w -X main.version=${runc_version#v} -extldflags -static" -o "$tmp/runc" \
		github.com/opencontainers/runc
}

install_packages
cached_build node-bins "$out" build_node_bins
