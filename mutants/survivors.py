#!/usr/bin/env python3
"""Compares the mutants cargo-mutants found surviving with the list of
known survivors in mutants/survivors.txt.

    survivors.py check LIST MISSED   exit 1 if MISSED holds a mutant LIST does not
    survivors.py merge LIST MISSED   print LIST rewritten to MISSED, keeping the
                                     reasons of mutants it already had

LIST lines are `<mutant name>  # <reason>`; blank lines and lines starting
with `#` are comments. Names are cargo-mutants' without line and column
(line and column are dropped), so a list stays valid while code moves. The same name
can appear more than once (the same change at two places of a function):
each line stands for one survivor.
"""

import collections
import re
import sys

LINE_COL = re.compile(r"^([^:]+\.rs):\d+:\d+:")


def normal(name):
    """A mutant's name without its line and column."""
    return LINE_COL.sub(r"\1:", name.strip())


def read_list(path):
    """Known survivors: name -> reasons, one per line listed."""
    known = collections.defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, reason = line.partition("  # ")
            known[normal(name)].append(reason.strip())
    return known


def read_missed(path):
    with open(path, encoding="utf-8") as f:
        return collections.Counter(normal(line) for line in f if line.strip())


def check(list_path, missed_path):
    known = read_list(list_path)
    missed = read_missed(missed_path)
    new = []
    for name, n in sorted(missed.items()):
        extra = n - len(known.get(name, []))
        new.extend([name] * max(0, extra))
    if new:
        print(f"{len(new)} mutant(s) survived that {list_path} does not list:")
        for name in new:
            print(f"  {name}")
        print(
            "Write a test that catches each, or, if it cannot be caught (an\n"
            "equivalent mutant), add it to the list with a one-line reason."
        )
        return 1
    print(f"no new survivors ({sum(missed.values())} known ones seen)")
    return 0


def merge(list_path, missed_path):
    known = read_list(list_path)
    missed = read_missed(missed_path)
    with open(list_path, encoding="utf-8") as f:
        header = [line.rstrip("\n") for line in f if line.startswith("#")]
    out = header + [""] if header else []
    for name, n in sorted(missed.items()):
        reasons = known.get(name, [])
        for i in range(n):
            reason = reasons[i] if i < len(reasons) else "TODO: reason or test"
            out.append(f"{name}  # {reason}")
    print("\n".join(out))
    return 0


def main(argv):
    if len(argv) != 4 or argv[1] not in ("check", "merge"):
        print(__doc__, file=sys.stderr)
        return 2
    return {"check": check, "merge": merge}[argv[1]](argv[2], argv[3])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
