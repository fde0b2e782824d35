#!/usr/bin/env bash
# Instructions per iteration of the hot paths (rsocket-proto's and the
# shard's), counted by valgrind's callgrind: repeatable on a shared VM where
# nanoseconds are not.
#
# Usage:
#   perf/proto-instructions.sh [iterations]         print the counts
#   perf/proto-instructions.sh --check [iterations] compare with
#       perf/instructions.baseline; fail when a path costs more than
#       TOLERANCE percent (default 3) over its baseline
#
# The baseline is updated on purpose, in a commit that says why:
#   perf/proto-instructions.sh > perf/instructions.baseline
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
if [ "${1:-}" = "--check" ]; then
    check=true
    shift
fi
n=${1:-20000}
tolerance=${TOLERANCE:-3}
baseline=perf/instructions.baseline

# One codegen unit and fat LTO: what gets inlined then depends on the code
# on the path, not on how the compiler happens to split crates into units,
# so a count moves when that code changes and not otherwise. Its own target
# directory keeps these settings from rebuilding the normal release build.
target=${CARGO_TARGET_DIR:-target}/instructions
CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_LTO=fat \
    cargo build -q --release -p rsbroker-benches --example hotpath --target-dir "$target"
bin=$target/release/examples/hotpath

count() { # path iterations -> total instructions
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 |
        awk '/Collected :/ {print $4}'
}

paths="view decode_and_route route_key receive_and_forward shard_route shard_rr shard_stream_item shard_stream_16"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
printf '%-22s %s\n' path instructions/iteration
for path in $paths; do
    # Two runs cancel out start-up and set-up costs.
    a=$(count "$path" "$n")
    b=$(count "$path" $((2 * n)))
    printf '%-22s %s\n' "$path" $(( (b - a) / n )) | tee -a "$results"
done

$check || exit 0
echo
echo "against $baseline (fails above +${tolerance}%):"
awk -v tol="$tolerance" '
    NR == FNR { if ($1 != "path") base[$1] = $2; next }
    {
        path = $1; now = $2
        if (!(path in base)) { printf "%-22s %8d  (no baseline)\n", path, now; next }
        pct = (now - base[path]) * 100.0 / base[path]
        verdict = pct > tol ? "SLOWER" : (pct < -tol ? "faster: update the baseline" : "ok")
        printf "%-22s %8d  baseline %8d  %+6.1f%%  %s\n", path, now, base[path], pct, verdict
        if (pct > tol) failed = 1
    }
    END { exit failed }
' "$baseline" "$results"
