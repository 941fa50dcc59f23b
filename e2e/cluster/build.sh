#!/usr/bin/env bash
# Builds the Go binaries the end-to-end tests run: the multi-call binary `k8s`
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, and a real node's
# kubelet and kube-proxy) and `kwok`.
#
# The binaries land in $GANTRY_CACHE/k8s-bins/<key>, where <key> hashes every input that
# decides their content (this script, the Go modules, main.go and the Go toolchain version), so
# a build happens only when a pin changes. $GANTRY_CACHE/k8s-bins/current points at the latest.
#
#   build.sh               build if needed, print the directory
#   build.sh --print-dir   only print the directory the binaries belong in
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${GANTRY_CACHE:-$HOME/.cache/gantry}
go=${GO:-go}

key=$(
	{
		cat "$here/build.sh" "$here/go.mod" "$here/go.sum" "$here/main.go" \
			"$here/kwok/go.mod" "$here/kwok/go.sum"
		"$go" env GOVERSION GOOS GOARCH
	} | sha256sum | cut -c1-16
)
out=$cache/k8s-bins/$key

if [[ ${1:-} == --print-dir ]]; then
	echo "$out"
	exit 0
fi

programs=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

if [[ -f $out/.complete ]]; then
	echo "k8s-bins: up to date in $out" >&2
else
	start=$(date +%s)
	tmp=$out.tmp.$$
	rm -rf "$tmp"
	mkdir -p "$tmp"
	trap 'rm -rf "$tmp"' EXIT

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
	touch "$tmp/.complete"
	rm -rf "$out"
	mv "$tmp" "$out"
	trap - EXIT
	echo "k8s-bins: built in $(($(date +%s) - start)) s" >&2
fi

ln -sfn "$key" "$cache/k8s-bins/current"
echo "$out"
