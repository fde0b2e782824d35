#!/usr/bin/env python3
"""Checks that rsbroker.service's SystemCallFilter allows every system call
rsbroker makes.

Runs the broker under strace with real traffic (an echo responder, requests
of every kind, a metrics scrape, SIGHUP, SIGTERM), lists the system calls
it made, expands the unit's SystemCallFilter lines with
`systemd-analyze syscall-filter`, and prints any call the filter would deny.
Exit 0 when none is denied.

usage: check-syscalls.py run RSBROKER ECHO_EXAMPLE CALL_EXAMPLE [UNIT]
       check-syscalls.py trace STRACE_SUMMARY [UNIT]
The second form checks the summary (`strace -f -c -o FILE`) of a run made
by someone else, such as the test suite.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def group(name, cache={}):
    """The system calls in a filter group, nested groups expanded."""
    if name in cache:
        return cache[name]
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        capture_output=True, text=True, check=True,
    ).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= group(item) if item.startswith("@") else {item}
    cache[name] = calls
    return calls


def allowed_by(unit_path):
    """Applies the unit's SystemCallFilter lines in order, as systemd does:
    the first allow list starts the set, `~` lines remove, later allow
    lines add."""
    allowed = None
    for line in open(unit_path):
        m = re.match(r"\s*SystemCallFilter=(.*)", line)
        if not m:
            continue
        spec = m.group(1).strip()
        deny = spec.startswith("~")
        items = spec.lstrip("~").split()
        calls = set()
        for item in items:
            calls |= group(item) if item.startswith("@") else {item}
        if allowed is None:
            if deny:
                raise SystemExit("this check expects an allow list first")
            allowed = calls
        elif deny:
            allowed -= calls
        else:
            allowed |= calls
    if allowed is None:
        raise SystemExit("no SystemCallFilter in " + unit_path)
    return allowed


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def used_by_broker(rsbroker, echo, call):
    port, admin = free_port(), free_port()
    broker_addr = "127.0.0.1:%d" % port
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace")
        broker = subprocess.Popen(
            ["strace", "-f", "-qq", "-c", "-o", trace, rsbroker,
             "--listen", "tcp://" + broker_addr, "--shards", "2",
             "--admin", "127.0.0.1:%d" % admin, "--log", "warn"],
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", admin), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or broker.poll() is not None:
                    raise SystemExit("the broker did not start")
                time.sleep(0.1)
        responder = subprocess.Popen([echo, "--broker", broker_addr],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        for args in (["com.example.Echo.hello", "hi"],
                     ["--stream", "2", "com.example.Echo.count", "5"],
                     ["--fnf", "com.example.Echo.log", "note"],
                     ["com.example.Missing.call"]):
            subprocess.run([call, "--broker", broker_addr] + args,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        with socket.create_connection(("127.0.0.1", admin)) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            while s.recv(65536):
                pass
        # strace's pid is not the broker's: signal the traced child.
        pid = int(subprocess.run(["pgrep", "-P", str(broker.pid)],
                                 capture_output=True, text=True).stdout.split()[0])
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        broker.wait(timeout=60)
        responder.terminate()
        responder.wait(timeout=10)
        return calls_in(trace)


def calls_in(trace):
    """The system calls in an `strace -c` summary."""
    calls = set()
    for line in open(trace):
        fields = line.split()
        if fields and re.fullmatch(r"[a-z_0-9]+", fields[-1]) and fields[-1] not in ("total", "syscall"):
            calls.add(fields[-1])
    return calls


def main():
    args = sys.argv[1:]
    if len(args) >= 4 and args[0] == "run":
        rsbroker, echo, call = args[1:4]
        unit = args[4] if len(args) > 4 else None
        used = used_by_broker(rsbroker, echo, call)
    elif len(args) >= 2 and args[0] == "trace":
        unit = args[2] if len(args) > 2 else None
        used = calls_in(args[1])
    else:
        raise SystemExit(__doc__)
    allowed = allowed_by(unit or os.path.join(HERE, "rsbroker.service"))
    # execve happens before the filter applies (systemd allows it for the start).
    denied = sorted(used - allowed - {"execve"})
    print("system calls made: %d; denied by the unit's filter: %s"
          % (len(used), ", ".join(denied) or "none"))
    sys.exit(1 if denied else 0)


if __name__ == "__main__":
    main()
