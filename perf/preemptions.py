#!/usr/bin/env python3
"""Who took the CPU from the measured processes, and for how long.

Runs COMMAND (a bench scenario, say) under `perf record -e
sched:sched_switch` on the given CPUs, then lists every interval of at least
--min-ms during which a thread of rsbroker, loadgen or nats-server was ready
to run (preempted, state R) but another thread had its CPU, with what ran
instead. Open-loop tails are made of such intervals: at 50% load a 5 ms stall
delays every request that arrives in it and the ones queued behind, until the
backlog drains.

usage: perf/preemptions.py [--min-ms 1] [--cpus 0,1] -- COMMAND [ARGS...]
example: perf/preemptions.py -- perf/bench.py --rounds 1 --out /tmp/r rr-open-50

Needs `perf` (linux-perf) and root (or kernel.perf_event_paranoid <= -1).
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

MEASURED = ("rsbroker", "loadgen", "nats-server")
SWITCH = re.compile(
    r"\[(\d+)\]\s+([\d.]+): sched:sched_switch: prev_comm=(.*?) prev_pid=(\d+) .*?"
    r"prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")


def switches(data):
    out = subprocess.run(["perf", "script", "-i", data, "-F", "cpu,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = SWITCH.search(line)
        if m:
            cpu, t, prev, prev_pid, state, nxt, next_pid = m.groups()
            yield int(cpu), float(t), prev, prev_pid, state, nxt, next_pid


def preemptions(events, min_ms):
    """(start, ms, cpu, thread, {other thread: ms}) for each long preemption,
    and the total ms per other thread over all of them."""
    waiting = {}  # pid -> (since, cpu, comm, {name: ms})
    running = {}  # cpu -> (since, comm)
    found, totals = [], collections.Counter()
    for cpu, t, prev, prev_pid, state, nxt, next_pid in events:
        if cpu in running:
            since, comm = running[cpu]
            if not comm.startswith(MEASURED) and not comm.startswith("swapper"):
                for w in waiting.values():
                    if w[1] == cpu:
                        w[3][comm] += (t - max(since, w[0])) * 1e3
        running[cpu] = (t, nxt)
        if prev.startswith(MEASURED) and state.startswith("R"):
            waiting[prev_pid] = (t, cpu, prev, collections.Counter())
        if next_pid in waiting:
            since, c, comm, others = waiting.pop(next_pid)
            ms = (t - since) * 1e3
            # Taken by threads of the measured processes themselves (Go's
            # runtime threads, say) is not interference.
            if ms >= min_ms and others:
                found.append((since, ms, c, comm, others))
                totals.update(others)
    return found, totals


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-ms", type=float, default=1.0)
    ap.add_argument("--cpus", default="0,1")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "sched.data")
        rc = subprocess.run(["perf", "record", "-q", "-e", "sched:sched_switch", "-C", args.cpus,
                             "-o", data, "--"] + command).returncode
        if not os.path.exists(data):
            sys.exit("perf record failed (is linux-perf installed, and are you root?)")
        events = list(switches(data))
    if not events:
        sys.exit("no scheduler events recorded")
    start = events[0][1]
    found, totals = preemptions(events, args.min_ms)
    print("%d preemptions of %s threads by other threads, lasting >= %g ms:"
          % (len(found), "/".join(MEASURED), args.min_ms))
    for since, ms, cpu, comm, others in found:
        who = ", ".join("%s %.1f ms" % kv for kv in others.most_common(3))
        print("  +%8.3f s  CPU%d  %-16s off %5.1f ms; ran instead: %s"
              % (since - start, cpu, comm, ms, who))
    if totals:
        print("time taken in them, by thread: " + ", ".join(
            "%s %.1f ms" % kv for kv in totals.most_common(6)))
    sys.exit(rc)


if __name__ == "__main__":
    main()
