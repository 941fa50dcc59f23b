#!/usr/bin/env bash
# GPU bench for gantry-vcuda. Needs: an NVIDIA GPU and driver, cargo, python3 with torch and
# cupy, nvidia-smi, nm. Writes everything to $OUT (default ./bench-out) and prints a summary.
#   bench/run.sh              # all parts
#   PARTS="overhead" bench/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../../.." && pwd)
OUT=${OUT:-$PWD/bench-out}
PARTS=${PARTS:-"symbols memcap smi util overhead"}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
mkdir -p "$OUT"
summary="$OUT/summary.md"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

(cd "$repo" && cargo build --release -q -p gantry-vcuda)
target=${CARGO_TARGET_DIR:-$repo/target}
LIB="$target/release/libgantry_vcuda.so"
SYMCHECK="$target/release/gantry-vcuda-symcheck"
test -f "$LIB"

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader -i 0)
uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i 0)
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)
say "# gantry-vcuda GPU bench, $(date -u +%Y-%m-%d), $gpu"
say ""

config() { # config NAME MEMORY_BYTES|null PERCENT
  local f="$OUT/$1.json"
  printf '{"version":1,"accountFile":"%s","devices":[{"uuid":"%s","memoryBytes":%s,"computePercent":%s}]}\n' \
    "$OUT/$1.account" "$uuid" "$2" "$3" >"$f"
  rm -f "$OUT/$1.account"
  echo "$f"
}
with() { # with CONFIG CMD...
  local cfg=$1; shift
  LD_PRELOAD="$LIB" GANTRY_VCUDA_CONFIG="$cfg" "$@"
}

if [[ " $PARTS " == *" symbols "* ]]; then
  libcuda=$(ldconfig -p | awk '/libcuda.so.1 /{print $NF; exit}')
  say "## Symbol check against $libcuda"
  nm -D --defined-only "$libcuda" | "$SYMCHECK" | tee -a "$summary" || say "**symbol check failed**"
  say ""
fi

if [[ " $PARTS " == *" memcap "* ]]; then
  cap=$((4 << 30))
  cfg=$(config memcap "$cap" 100)
  say "## (a) Memory cap of 4 GiB"
  for fw in torch cupy; do
    with "$cfg" python3 "$here/memcap.py" "$fw" 2>&1 | tee "$OUT/memcap-$fw.txt" | tail -3 | tee -a "$summary"
  done
  say ""
fi

if [[ " $PARTS " == *" smi "* ]]; then
  cfg=$(config smi $((6 << 30)) 100)
  say "## (b) nvidia-smi inside the capped container (cap 6 GiB = 6144 MiB)"
  with "$cfg" nvidia-smi --query-gpu=memory.total,memory.used,memory.free --format=csv | tee -a "$summary"
  say ""
fi

sample_util() { # sample_util SECONDS -> mean utilization.gpu over the middle of the run
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -i 0 -lms 200 >"$OUT/util.samples" &
  local smi=$!
  sleep "$1"
  kill "$smi"; wait "$smi" 2>/dev/null || true
  awk -v n="$(wc -l <"$OUT/util.samples")" 'NR>n/4 && NR<=3*n/4 {s+=$1; c++} END {printf "%.1f", s/c}' "$OUT/util.samples"
}

if [[ " $PARTS " == *" util "* ]]; then
  say "## (c) GPU utilisation under a compute share (nvidia-smi utilization.gpu, mean of the middle half)"
  say ""
  say "| share | saturating kernel | CUDA graph launches |"
  say "|---|---|---|"
  for pct in 25 50 75 100; do
    row="| $pct % |"
    for mode in kernel graph; do
      cfg=$(config "util-$pct-$mode" null "$pct")
      with "$cfg" python3 "$here/load.py" "$mode" "$SECONDS_PER_RUN" >"$OUT/load-$pct-$mode.txt" 2>&1 &
      load=$!
      sleep 3
      u=$(sample_util $((SECONDS_PER_RUN - 5)))
      wait "$load"
      row="$row $u % |"
    done
    say "$row"
  done
  say ""
fi

if [[ " $PARTS " == *" overhead "* ]]; then
  # a cap and a share that do not bind: every hook does its full work, nothing is refused or slowed
  cfg=$(config overhead $((total_mib << 20)) 100)
  say "## (d) Overhead: 8192x8192 fp16 matmul, no binding limit (median of 5 alternating trials)"
  : >"$OUT/overhead.txt"
  for t in 1 2 3 4 5; do
    echo "bare $(python3 "$here/matmul.py")" >>"$OUT/overhead.txt"
    echo "vcuda $(with "$cfg" python3 "$here/matmul.py")" >>"$OUT/overhead.txt"
  done
  python3 - "$OUT/overhead.txt" <<'PY' | tee -a "$summary"
import statistics, sys
v = {}
for line in open(sys.argv[1]):
    k, x = line.split()
    v.setdefault(k, []).append(float(x))
bare, lib = statistics.median(v["bare"]), statistics.median(v["vcuda"])
print(f"bare {bare:.4f} ms/iter, with library {lib:.4f} ms/iter, overhead {100 * (lib - bare) / bare:.3f} %")
PY
fi

echo "summary written to $summary"
