#!/usr/bin/env bash
# Builds the Go binaries the end-to-end tests run: the multi-call binary `k8s`
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, and a real node's
# kubelet and kube-proxy) and `kwok`.
#
# The binaries land in $GANTRY_CACHE/k8s-bins/<key> (see ../cached-build.sh); the key hashes
# this script, the Go modules, main.go and the Go toolchain.
#
#   build.sh               build if needed, print the directory
#   build.sh --print-dir   only print the directory the binaries belong in
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../cached-build.sh
source "$here/../cached-build.sh"

out=$(cache_dir k8s-bins "$here/build.sh" "$here/go.mod" "$here/go.sum" "$here/main.go" \
	"$here/kwok/go.mod" "$here/kwok/go.sum")
if [[ ${1:-} == --print-dir ]]; then
	echo "$out"
	exit 0
fi

programs=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

build_k8s_bins() {
	local tmp=$1
	k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/go.mod")
	major=${k8s_version#v}
	major=${major%%.*}
	minor=${k8s_version#v*.}
	minor=${minor%%.*}
	build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
	ldflags="-s -w"
	# Both version packages: component-base's serves /version and the components' --version,
	# client-go's is what kubectl reports as its client version.
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major"
		ldflags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
		ldflags+=" -X $pkg.buildDate=$build_date"
	done

	echo "k8s-bins: building Kubernetes $k8s_version control plane and kwok into $out" >&2
	export CGO_ENABLED=0
	(cd "$here" && "$go" build -mod=readonly -trimpath -ldflags="$ldflags" -o "$tmp/k8s" .)
	(cd "$here/kwok" && "$go" build -mod=readonly -trimpath -ldflags="-s -w" -o "$tmp/kwok" \
		sigs.k8s.io/kwok/cmd/kwok)
	for p in "${programs[@]}"; do
		ln -s k8s "$tmp/$p"
	done
}

cached_build k8s-bins "$out" build_k8s_bins
