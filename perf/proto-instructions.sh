#!/usr/bin/env bash
# Instructions per iteration of rsocket-proto's hot paths, counted by
# valgrind's callgrind: repeatable on a shared VM where nanoseconds are not.
# Usage: perf/proto-instructions.sh [iterations]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100000}
cargo build -q --release -p rsbroker-benches --example hotpath
bin=target/release/examples/hotpath
count() { # path iterations -> total instructions
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 |
        awk '/Collected :/ {print $4}'
}
printf '%-22s %s\n' path instructions/iteration
for path in view decode_and_route route_key receive_and_forward shard_rr shard_stream_item shard_stream_16; do
    # Two runs cancel out start-up and set-up costs.
    a=$(count "$path" "$n")
    b=$(count "$path" $((2 * n)))
    printf '%-22s %s\n' "$path" $(( (b - a) / n ))
done
