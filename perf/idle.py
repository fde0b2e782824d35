#!/usr/bin/env python3
"""Idle app connections: what a broker holds for each, and how fast it takes
them, against nats-server holding the same number of subscribed connections
in the same run.

For each system (rsbroker with one shard, nats-server with GOMAXPROCS=1,
both alone on CPU0) and each wave, the script opens N connections from
CPU1, each one an app: for rsbroker a SETUP whose composite metadata names
the app (its own uuid) and, for every --publish-every'th connection, a
service it publishes; for nats-server a CONNECT and a SUB. It waits until
the system has taken them all (the broker's /api/overview counts the
connections and the instances; nats-server answers a PING sent after the
SUB on every connection), reads the system's RSS from /proc, then closes
them all. Wave 2 opens N new ones: by then every buffer the first wave
touched is resident, which is what a broker with churn holds.

With --rr, while the last wave is connected, loadgen runs rr-max against
the system, and once more with no idle connections (same binary, same
run), so the two rr figures compare.

usage: perf/idle.py [--connections N] [--waves W] [--publish-every K]
                    [--systems rsbroker,nats] [--rr SECONDS] [--json FILE]

Connections come from source addresses 127.0.0.2, 127.0.0.3, ... in turn
(5 000 per address), so 50 000 fit in the ephemeral port range; the
script raises its descriptor limit to what it needs.
"""
import argparse
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ports import free_port, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
PER_SOURCE = 5_000
BROKER = os.path.join(BIN, "rsbroker")


def frame(stream, ftype, flags, body):
    f = struct.pack(">IH", stream, (ftype << 10) | flags) + body
    return struct.pack(">I", len(f))[1:] + f


def entry(mime_id, content):
    return bytes([0x80 | mime_id]) + struct.pack(">I", len(content))[1:] + content


def setup(i, publish):
    composite = b"message/x.rsocket.composite-metadata.v0"
    data = b"application/octet-stream"
    app = json.dumps({"name": "idle-app", "uuid": "idle-%d" % i}).encode()
    md = entry(0x51, app)
    if publish:
        reg = json.dumps({"published": [{"service": "idle.Service%d" % (i % 1000)}]}).encode()
        md += entry(0x54, reg)
    # Keepalive 60 s, lifetime 600 s: the broker never closes them in a run.
    body = (struct.pack(">HHII", 1, 0, 60_000, 600_000)
            + bytes([len(composite)]) + composite + bytes([len(data)]) + data
            + struct.pack(">I", len(md))[1:] + md)
    return frame(0, 1, 0x100, body)


def cpu_s(pid):
    """CPU time (user + system) the process has used, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid, seconds=2.0):
    """The share of a core the process uses while its connections are idle."""
    c0, t0 = cpu_s(pid), time.time()
    time.sleep(seconds)
    return (cpu_s(pid) - c0) / (time.time() - t0)


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def overview(admin):
    with urllib.request.urlopen("http://127.0.0.1:%d/api/overview" % admin, timeout=5) as r:
        return json.load(r)


def open_all(n, port, hello, wait_reply):
    """Opens n connections and sends each its hello; returns the sockets
    and when the last hello was written (or the last reply read)."""
    socks = []
    sel = selectors.DefaultSelector()
    for i in range(n):
        s = socket.socket()
        # The port is chosen at connect (so TIME_WAIT entries of another
        # destination do not count), and a close resets: a wave leaves none.
        s.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.bind(("127.0.0.%d" % (2 + i // PER_SOURCE), 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE, i)
        # Keep the accept queue short: send what is connected every 256.
        if i % 256 == 255 or i == n - 1:
            drain_writes(sel, hello, wait_reply)
    while sel.get_map():
        drain_writes(sel, hello, wait_reply, block=True)
    return socks


def drain_writes(sel, hello, wait_reply, block=False):
    while True:
        events = sel.select(timeout=1.0 if block else 0)
        if not events:
            return
        for key, mask in events:
            s, i = key.fileobj, key.data
            if mask & selectors.EVENT_WRITE:
                s.sendall(hello(i))
                if wait_reply:
                    sel.modify(s, selectors.EVENT_READ, i)
                else:
                    sel.unregister(s)
            else:
                got = s.recv(4096)
                if b"PONG" in got:
                    sel.unregister(s)
                elif not got:
                    raise SystemExit("connection %d closed by the server" % i)
        if not block:
            return


def start(system, tmp, port, admin):
    if system == "rsbroker":
        cmd = [BROKER, "--listen", "tcp://127.0.0.1:%d" % port,
               "--shards", "1", "--log", "warn", "--config", os.path.join(tmp, "idle.toml")]
        with open(os.path.join(tmp, "idle.toml"), "w") as f:
            f.write("[admin]\nlisten = \"127.0.0.1:%d\"\n" % admin)
        env = None
    else:
        cmd = [shutil.which("nats-server") or "nats-server", "-a", "127.0.0.1", "-p", str(port)]
        env = dict(os.environ, GOMAXPROCS="1")
    # IDLE_WRAP: a profiler to run the system under (e.g. "heaptrack").
    proc = subprocess.Popen(["taskset", "-c", "0"] + os.environ.get("IDLE_WRAP", "").split() + cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_port(port, proc, system)
    if system == "rsbroker":
        wait_port(admin, proc, "the broker's admin server")
    return proc


def hello_of(system, publish_every):
    if system == "rsbroker":
        cache = {}

        def hello(i):
            if i not in cache:
                cache.clear()
                cache[i] = setup(i, publish_every > 0 and i % publish_every == 0)
            return cache[i]
        return hello
    return lambda i: b"CONNECT {\"verbose\":false}\r\nSUB idle.%d 1\r\nPING\r\n" % i


def wave(system, proc, port, admin, n, publish_every):
    base = overview(admin) if system == "rsbroker" else None
    t0 = time.time()
    socks = open_all(n, port, hello_of(system, publish_every), wait_reply=(system == "nats"))
    if system == "rsbroker":
        want_instances = (n + publish_every - 1) // publish_every if publish_every else 0
        end = time.time() + 60
        while True:
            o = overview(admin)
            if o["connections"] >= n and o["instances"] >= base["instances"] + want_instances:
                break
            if time.time() > end:
                raise SystemExit("the broker took %d of %d connections" % (o["connections"], n))
            time.sleep(0.005)
    took = time.time() - t0
    time.sleep(1.0)
    return socks, took, rss(proc.pid)


def close_all(socks, system, admin):
    for s in socks:
        s.close()
    if system == "rsbroker":
        end = time.time() + 60
        while overview(admin)["connections"] > 0 and time.time() < end:
            time.sleep(0.05)
    time.sleep(1.0)


def rr(system, port, seconds, tmp):
    out = os.path.join(tmp, "rr.json")
    target = (["--broker", "tcp://127.0.0.1:%d" % port] if system == "rsbroker"
              else ["--nats", "nats://127.0.0.1:%d" % port])
    cmd = ["taskset", "-c", "1", os.path.join(BIN, "loadgen"), "requester"] + target + [
        "--serve=", "--interaction", "rr", "--connections", "4", "--max", "--concurrency", "32",
        "--spin", "--duration", "%gs" % seconds, "--warmup", "1s", "--json", out, "--quiet"]
    subprocess.run(cmd, capture_output=True, text=True)
    with open(out) as f:
        r = json.load(f)
    return r["achieved_rps"]


def run(system, args, tmp):
    port, admin = free_port(), free_port()
    proc = start(system, tmp, port, admin)
    try:
        time.sleep(0.5)
        out = dict(system=system, connections=args.connections, rss_start=rss(proc.pid), waves=[])
        if args.rr:
            out["rr_alone"] = rr(system, port, args.rr, tmp)
        for w in range(args.waves):
            socks, took, held = wave(system, proc, port, admin, args.connections,
                                     args.publish_every)
            per = (held - out["rss_start"]) / args.connections
            idle = idle_cpu(proc.pid)
            out["waves"].append(dict(took_s=round(took, 3), rss=held, per_connection=round(per),
                                     idle_cpu=round(idle, 4)))
            print("%-9s wave %d: %d connections in %.2f s, RSS %.1f MiB, %.1f KiB per connection,"
                  " %.1f%% of a core while they are idle"
                  % (system, w + 1, args.connections, took, held / 2**20, per / 1024, 100 * idle),
                  flush=True)
            if w + 1 == args.waves and args.rr:
                out["rr_with_idle"] = rr(system, port, args.rr, tmp)
                print("%-9s rr-max %.0f/s alone, %.0f/s beside %d idle connections (%.3fx)"
                      % (system, out["rr_alone"], out["rr_with_idle"], args.connections,
                         out["rr_with_idle"] / out["rr_alone"]), flush=True)
            close_all(socks, system, admin)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--waves", type=int, default=2)
    p.add_argument("--publish-every", type=int, default=2,
                   help="every K-th rsbroker connection publishes a service (0: none)")
    p.add_argument("--systems", default="rsbroker,nats")
    p.add_argument("--rr", type=float, default=0, help="seconds of rr-max with and without")
    p.add_argument("--json")
    p.add_argument("--binary", help="the rsbroker binary (default target/release/rsbroker)")
    args = p.parse_args()
    if args.binary:
        global BROKER
        BROKER = args.binary
    need = args.connections + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
        except (ValueError, OSError):
            raise SystemExit("%d connections need %d descriptors per process; the hard limit is %d "
                             "and cannot be raised here (CAP_SYS_RESOURCE)" % (args.connections,
                                                                                need, hard))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in args.systems.split(","):
            results.append(run(system, args, tmp))
    if len(results) == 2:
        a, b = results
        ratio = a["waves"][-1]["per_connection"] / max(1, b["waves"][-1]["per_connection"])
        print("per idle connection, last wave: %s/%s = %.2f" % (a["system"], b["system"], ratio))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
