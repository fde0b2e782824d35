#!/usr/bin/env bash
# Mutation testing of the sans-IO crates (rsocket-proto, rsbroker-core)
# with cargo-mutants; .cargo/mutants.toml says what is mutated and tested.
#
#   mutants/check.sh          mutate only the lines of broker/proto/src and
#                             broker/core/src changed since mutants/base, and
#                             fail if a mutant survives that
#                             mutants/survivors.txt does not list (CI).
#   mutants/check.sh --all    mutate all of both crates (about an hour and a half on
#                             2 cores), rewrite mutants/survivors.txt from
#                             what survived (keeping the reasons already
#                             written; new ones say TODO) and set
#                             mutants/base to HEAD.
#
# A diff with more than MUTANTS_MAX mutants (250) is checked one slice at
# a time, the slice chosen by the commit, so the step stays within its
# budget; every slice of a large change is covered across commits and by
# the next --all run.
set -euo pipefail
cd "$(dirname "$0")/.."

max=${MUTANTS_MAX:-250}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
args=(--line-col=false -j 2 --output "$out")

if [ "${1:-}" = "--all" ]; then
    start=$(date +%s)
    rc=0
    cargo mutants "${args[@]}" || rc=$?
    # 0: all caught, 2: some survived, 3: some timed out (a hang is caught).
    case $rc in 0 | 2 | 3) ;; *) echo "cargo mutants failed ($rc)" >&2; exit "$rc" ;; esac
    python3 mutants/survivors.py merge mutants/survivors.txt "$out/mutants.out/missed.txt" \
        > "$out/survivors.txt"
    mv "$out/survivors.txt" mutants/survivors.txt
    git rev-parse HEAD > mutants/base
    for f in caught missed timeout unviable; do
        printf '%-9s %s\n' "$f" "$(wc -l < "$out/mutants.out/$f.txt")"
    done
    echo "took $(( $(date +%s) - start )) s; mutants/survivors.txt rewritten"
    exit 0
fi

base=$(cat mutants/base)
if ! git cat-file -e "$base^{commit}" 2>/dev/null; then
    echo "mutants/base names $base, which this clone does not have" >&2
    exit 1
fi
git diff "$base" HEAD -- broker/proto/src broker/core/src > "$out/changes.diff"
if [ ! -s "$out/changes.diff" ]; then
    echo "no changes to broker/proto/src or broker/core/src since $base: nothing to mutate"
    exit 0
fi
count=$(cargo mutants --in-diff "$out/changes.diff" --list 2>/dev/null | wc -l)
echo "$count mutants in the lines changed since ${base:0:12}"
if [ "$count" -eq 0 ]; then
    exit 0
fi
if [ "$count" -gt "$max" ]; then
    slices=$(( (count + max - 1) / max ))
    head=$(git rev-parse HEAD)
    slice=$(( 16#${head:0:8} % slices ))
    echo "more than $max: testing slice $slice of $slices (chosen by the commit)"
    args+=(--shard "$slice/$slices")
fi
rc=0
cargo mutants "${args[@]}" --in-diff "$out/changes.diff" || rc=$?
case $rc in 0 | 2 | 3) ;; *) echo "cargo mutants failed ($rc)" >&2; exit "$rc" ;; esac
touch "$out/mutants.out/missed.txt"
python3 mutants/survivors.py check mutants/survivors.txt "$out/mutants.out/missed.txt"
