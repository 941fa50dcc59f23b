# Sourced by e2e/cluster/build.sh and e2e/node/build.sh: the cache both keep their Go builds in.
#
# A build lands in $GANTRY_CACHE/<name>/<key>, where <key> hashes every input that decides its
# content (the calling script, this file, its Go modules and sources, the Go toolchain), so a
# build happens only when a pin changes; $GANTRY_CACHE/<name>/current points at the latest.
# The calling script takes `--print-dir` to print the directory without building.

cache=${GANTRY_CACHE:-$HOME/.cache/gantry}
go=${GO:-go}

# cache_dir NAME INPUT...: the directory a build of these inputs belongs in.
cache_dir() {
	local name=$1
	shift
	local key
	key=$({ cat "${BASH_SOURCE[0]}" "$@"; "$go" env GOVERSION GOOS GOARCH; } | sha256sum | cut -c1-16)
	echo "$cache/$name/$key"
}

# cached_build NAME OUT BUILD: runs `BUILD TMP` unless OUT holds a complete build, then moves
# TMP to OUT (a failed build leaves nothing), points NAME/current at OUT and prints OUT.
cached_build() {
	local name=$1 out=$2 build=$3
	if [[ -f $out/.complete ]]; then
		echo "$name: up to date in $out" >&2
	else
		local start
		start=$(date +%s)
		cached_build_tmp=$out.tmp.$$
		rm -rf "$cached_build_tmp"
		mkdir -p "$cached_build_tmp"
		trap 'rm -rf "$cached_build_tmp"' EXIT
		("$build" "$cached_build_tmp")
		touch "$cached_build_tmp/.complete"
		rm -rf "$out"
		mv "$cached_build_tmp" "$out"
		trap - EXIT
		echo "$name: built in $(($(date +%s) - start)) s" >&2
	fi
	ln -sfn "$(basename "$out")" "$(dirname "$out")/current"
	echo "$out"
}
