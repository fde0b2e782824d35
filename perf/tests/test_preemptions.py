"""perf/preemptions.py's reading of scheduler switches (no perf needed)."""
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from preemptions import SWITCH, preemptions  # noqa: E402


def switch(cpu, t, prev, prev_pid, state, nxt, next_pid):
    return (cpu, t, prev, str(prev_pid), state, nxt, str(next_pid))


class Preemptions(unittest.TestCase):
    def test_a_preempted_broker_and_who_took_its_cpu(self):
        events = [
            switch(0, 1.000, "rsbroker-shard-", 10, "R", "kdamond.0", 77),
            switch(0, 1.004, "kdamond.0", 77, "S", "tokio-rt-worker", 5),
            switch(0, 1.005, "tokio-rt-worker", 5, "S", "rsbroker-shard-", 10),
        ]
        found, totals = preemptions(events, 1.0)
        self.assertEqual(len(found), 1)
        since, ms, cpu, comm, others = found[0]
        self.assertEqual((since, cpu, comm), (1.000, 0, "rsbroker-shard-"))
        self.assertAlmostEqual(ms, 5.0, places=6)
        self.assertAlmostEqual(others["kdamond.0"], 4.0, places=6)
        self.assertAlmostEqual(others["tokio-rt-worker"], 1.0, places=6)
        self.assertAlmostEqual(totals["kdamond.0"], 4.0, places=6)

    def test_sleeping_short_and_sibling_preemptions_are_not_listed(self):
        events = [
            # Parked (S): waiting for work, not preempted.
            switch(0, 1.000, "rsbroker-shard-", 10, "S", "kdamond.0", 77),
            switch(0, 1.010, "kdamond.0", 77, "S", "rsbroker-shard-", 10),
            # Preempted for 0.5 ms only.
            switch(1, 2.000, "loadgen-0-1", 20, "R", "kworker/1:2", 30),
            switch(1, 2.0005, "kworker/1:2", 30, "S", "loadgen-0-1", 20),
            # Preempted by another thread of a measured process.
            switch(0, 3.000, "nats-server", 40, "R", "nats-server", 41),
            switch(0, 3.005, "nats-server", 41, "S", "nats-server", 40),
        ]
        found, totals = preemptions(events, 1.0)
        self.assertEqual(found, [])
        self.assertEqual(sum(totals.values()), 0)

    def test_perf_script_lines_are_parsed(self):
        line = ("[001] 19617.259828: sched:sched_switch: prev_comm=loadgen-0-1 prev_pid=21309 "
                "prev_prio=120 prev_state=R+ ==> next_comm=kdamond.0 next_pid=77 next_prio=120")
        m = SWITCH.search(line)
        self.assertEqual(m.groups(), ("001", "19617.259828", "loadgen-0-1", "21309", "R+",
                                      "kdamond.0", "77"))


if __name__ == "__main__":
    unittest.main()
