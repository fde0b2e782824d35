#!/usr/bin/env python3
"""End-to-end scenarios: rsbroker against nats-server and against the direct
path (no broker), measured by the same loadgen in the same run.

On a 2-core machine the system under test (rsbroker with one shard,
nats-server with GOMAXPROCS=1, or for the direct path the responder itself)
runs alone on CPU0; loadgen's requester and responders run on CPU1, in one
process (requester --serve) that spins instead of parking (--spin). Each
scenario runs --rounds times per system (3 by default), the rounds
alternating between the systems, and the median round is reported, with the
system under test's CPU time per operation (utime + stime from /proc, which
does not depend on how fast loadgen is) and the CPU time every other thread
on the machine took during the round (what took the CPUs from the run).

usage: perf/bench.py [--rounds N] [--duration S] [--warmup S] [--smoke]
                     [--baseline BIN] [--systems A,B] [--out DIR] [scenario ...]

  --smoke     every scenario once, for one second: checks that it all runs.
  --baseline  another rsbroker binary, run as system "rsbroker-base" in
              rounds alternating with this build's (before/after a change).
  --systems   only these systems (e.g. rsbroker,rsbroker-base).
Scenarios: see SCENARIOS below; none named means all.
Results: DIR/<scenario>.json (every round, the medians, the commands),
DIR/summary.json, DIR/summary.md, DIR/*.hgrm; perf/plot.py draws the PNGs.
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ports import free_port, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
UNBOUNDED = 2**31 - 1
SUT_CPU = "0"
LOAD_CPU = "1"
TICK = os.sysconf("SC_CLK_TCK")

# A scenario: what the requester does, what the responder does, which
# systems run it. "rate_of" makes it an open-loop run at a fraction of a
# system's own max measured by another scenario in the same invocation.
SCENARIOS = {
    "rr-max": dict(
        what="request-response 64 B, 4 connections x 32 in flight, closed loop",
        requester=["--interaction", "rr", "--connections", "4", "--max", "--concurrency", "32"],
        systems=["rsbroker", "rsbroker-tls", "rsbroker-ws", "nats", "direct", "rsbroker-quic", "direct-quic", "quinn"],
    ),
    "rr-open-25": dict(
        what="request-response 64 B, 4 connections, open loop at 25% of each system's max",
        requester=["--interaction", "rr", "--connections", "4"],
        rate_of=("rr-max", 0.25),
        systems=["rsbroker", "nats", "direct"],
    ),
    "rr-open-50": dict(
        what="request-response 64 B, 4 connections, open loop at 50% of each system's max",
        requester=["--interaction", "rr", "--connections", "4"],
        rate_of=("rr-max", 0.50),
        systems=["rsbroker", "nats", "direct"],
    ),
    "rr-open-75": dict(
        what="request-response 64 B, 4 connections, open loop at 75% of each system's max",
        requester=["--interaction", "rr", "--connections", "4"],
        rate_of=("rr-max", 0.75),
        systems=["rsbroker", "nats", "direct"],
    ),
    "rr-1-in-flight": dict(
        what="request-response 64 B, one request in flight",
        requester=["--interaction", "rr", "--connections", "1", "--max", "--concurrency", "1"],
        systems=["rsbroker", "nats", "direct", "tcp-pingpong", "rsbroker-quic", "direct-quic", "quinn"],
    ),
    "rr-16k": dict(
        what="request-response 16 KiB, 4 connections x 8 in flight",
        requester=["--interaction", "rr", "--connections", "4", "--max", "--concurrency", "8",
                   "--payload-size", "16384"],
        systems=["rsbroker", "nats", "direct"],
    ),
    "rr-1-conn": dict(
        what="request-response 64 B, 1 connection x 32 in flight",
        requester=["--interaction", "rr", "--connections", "1", "--max", "--concurrency", "32"],
        systems=["rsbroker", "nats", "direct"],
    ),
    "rr-16-conns": dict(
        what="request-response 64 B, 16 connections x 8 in flight",
        requester=["--interaction", "rr", "--connections", "16", "--max", "--concurrency", "8"],
        systems=["rsbroker", "nats", "direct"],
    ),
    "rr-256-conns": dict(
        what="request-response 64 B, 256 connections x 1 in flight",
        requester=["--interaction", "rr", "--connections", "256", "--max", "--concurrency", "1"],
        systems=["rsbroker", "nats", "direct"],
    ),
    "fnf-max": dict(
        what="fire-and-forget 64 B, 4 connections, as fast as the connection takes them",
        requester=["--interaction", "fnf", "--connections", "4", "--max", "--concurrency", "1"],
        systems=["rsbroker", "nats", "direct"],
        ops="delivered",
    ),
    "fanout-16": dict(
        what="fire-and-forget 64 B broadcast to 16 subscribers, 1 publisher connection",
        requester=["--interaction", "fnf", "--connections", "1", "--max", "--concurrency", "1"],
        rsocket_requester=["--tag", "broadcast=1"],
        responder=["--instances", "16"],
        nats_responder=["--connections", "16", "--fanout"],
        systems=["rsbroker", "nats"],
        ops="delivered",
    ),
    "stream-unbounded": dict(
        what="request-stream 64 B items, 4 connections, REQUEST_N 2^31-1",
        requester=["--interaction", "stream", "--connections", "4", "--max", "--concurrency", "1",
                   "--request-n", str(UNBOUNDED)],
        responder=["--items", "1000000"],
        systems=["rsbroker", "rsbroker-tls", "rsbroker-ws", "direct", "rsbroker-quic", "direct-quic", "quinn"],
        ops="items",
    ),
    "stream-window-8": dict(
        what="request-stream 64 B items, 4 connections, REQUEST_N window of 8",
        requester=["--interaction", "stream", "--connections", "4", "--max", "--concurrency", "1",
                   "--request-n", "8"],
        responder=["--items", "100000"],
        systems=["rsbroker", "direct"],
        ops="items",
    ),
    "rr-stalled-consumer": dict(
        what="rr-max's request-response traffic, with (rsbroker-stalled) and without a consumer "
             "that asked the same responder for 2^31-1 items and stopped reading",
        requester=["--interaction", "rr", "--connections", "4", "--max", "--concurrency", "32"],
        responder=["--items", "2000000000"],
        systems=["rsbroker", "rsbroker-stalled"],
    ),
    "rr-setup-flood": dict(
        what="rr-max's request-response traffic, without and with a peer on 127.0.0.2 opening "
             "connection after connection whose SETUP carries a forged ES256 token: with the "
             "broker's budget for failed authentications (rsbroker-flooded) and without it "
             "(rsbroker-flooded-unbudgeted, every forged token checked)",
        requester=["--interaction", "rr", "--connections", "4", "--max", "--concurrency", "32"],
        systems=["rsbroker", "rsbroker-flooded", "rsbroker-flooded-unbudgeted"],
    ),
    "stream-64k": dict(
        what="request-stream 64 KiB items, 4 connections, REQUEST_N 2^31-1",
        requester=["--interaction", "stream", "--connections", "4", "--max", "--concurrency", "1",
                   "--request-n", str(UNBOUNDED), "--payload-size", "65536"],
        responder=["--items", "100000"],
        systems=["rsbroker", "direct", "rsbroker-quic", "direct-quic", "quinn"],
        ops="items",
    ),
}


def wait_udp(port, proc, what, timeout=20):
    """Waits until a UDP socket is bound to port (QUIC has no connect to try)."""
    want = ":%04X" % port
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("%s exited: %s" % (what, proc.args))
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            try:
                with open(table) as f:
                    rows = [line.split() for line in f.readlines()[1:]]
                if any(len(r) > 1 and r[1].endswith(want) for r in rows):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise SystemExit("%s did not bind UDP port %d" % (what, port))


def tls_files(tmp):
    """The self-signed certificate and key of tls_config."""
    tls_config(tmp)
    return os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")


# Systems where the responder itself is the system under test, on CPU0.
DIRECT = ("direct", "direct-quic", "quinn")


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(") ", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def stop(proc, sig=signal.SIGTERM, timeout=15):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pinned(cpu, args, env=None):
    return subprocess.Popen(["taskset", "-c", cpu] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


BASELINE = None

# A consumer that asks for 2^31-1 items of route "echo" and never reads:
# it sends SETUP, then a REQUEST_STREAM every 100 ms for 3 s (those sent
# before the responder registers are refused), then holds its socket.
STALL = r'''
import socket, struct, sys, time
def frame(stream, ftype, flags, body):
    f = struct.pack(">IH", stream, (ftype << 10) | flags) + body
    return struct.pack(">I", len(f))[1:] + f
mime = b"message/x.rsocket.composite-metadata.v0"
data = b"application/octet-stream"
setup = frame(0, 1, 0, struct.pack(">HHII", 1, 0, 60000, 600000)
              + bytes([len(mime)]) + mime + bytes([len(data)]) + data)
route = bytes([4]) + b"echo"
md = bytes([0x80 | 0x7E]) + struct.pack(">I", len(route))[1:] + route
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.sendall(setup)
for i in range(30):
    body = struct.pack(">I", 2**31 - 1) + struct.pack(">I", len(md))[1:] + md
    s.sendall(frame(2 * i + 1, 6, 0x100, body))
    time.sleep(0.1)
time.sleep(3600)
'''

# A peer that opens connection after connection from 127.0.0.2, FLOOD_RATE
# a second, each with a SETUP whose bearer token is ES256-shaped with a
# random signature (the broker checks it against its key: as costly as a
# good one), reads the answer and closes; every 100 SETUPs it writes how
# many it made. The same rate in both flooded systems, so that the broker
# is what differs (the flood takes some of loadgen's CPU in both).
FLOOD_RATE = 1000
FLOOD = r'''
import base64, json, os, socket, struct, sys, time
def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")
def frame(stream, ftype, flags, body):
    f = struct.pack(">IH", stream, (ftype << 10) | flags) + body
    return struct.pack(">I", len(f))[1:] + f
def entry(mime, content):
    return bytes([0x80 | mime]) + struct.pack(">I", len(content))[1:] + content
header = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
claims = b64(json.dumps({"sub": "flood", "exp": int(time.time()) + 3600}).encode())
token = header + b"." + claims + b"." + b64(os.urandom(64))
md = entry(0x51, b'{"name":"flood","uuid":"flood-1"}') + entry(0x7C, bytes([0x81]) + token)
mime = b"message/x.rsocket.composite-metadata.v0"
data = b"application/octet-stream"
setup = frame(0, 1, 0x100, struct.pack(">HHII", 1, 0, 60000, 600000)
              + bytes([len(mime)]) + mime + bytes([len(data)]) + data
              + struct.pack(">I", len(md))[1:] + md)
port, out, rate = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
n, t0 = 0, time.monotonic()
while True:
    ahead = t0 + n / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", port))
    s.sendall(setup)
    while s.recv(4096):
        pass
    s.close()
    n += 1
    if n % 100 == 0:
        with open(out, "w") as f:
            f.write("%d %f" % (n, time.monotonic() - t0))
'''


def flood_config(tmp, budgeted):
    """A config with an ES256 key for bearer tokens (anonymous connections
    still let in); unbudgeted: every failed authentication is checked."""
    public = os.path.join(tmp, "es256.pub.pem")
    if not os.path.exists(public):
        private = os.path.join(tmp, "es256.key")
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                        "-out", private], check=True, capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", private, "-pubout", "-out", public],
                       check=True, capture_output=True)
    config = os.path.join(tmp, "flood-%s.toml" % ("budgeted" if budgeted else "unbudgeted"))
    with open(config, "w") as f:
        f.write('[auth.jwt]\nkeys = ["%s"]\n' % public)
        if not budgeted:
            f.write("[auth.failures]\nper_address_burst = 4294967295\n"
                    "per_address_per_minute = 4294967295\nper_shard_per_second = 1000000000\n")
    return config


def tls_config(tmp):
    """A config naming a self-signed certificate for 127.0.0.1 (made once per run)."""
    config = os.path.join(tmp, "tls.toml")
    if not os.path.exists(config):
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-addext", "basicConstraints=critical,CA:FALSE",
                        "-keyout", key, "-out", cert], check=True, capture_output=True)
        with open(config, "w") as f:
            f.write('[tls]\ncertificate = "%s"\nkey = "%s"\n' % (cert, key))
    return config


def start_system(system, tmp):
    """Starts the system under test; returns (process, pid, target args for loadgen)."""
    port = free_port()
    if system.startswith("rsbroker"):
        binary = BASELINE if "-base" in system else os.path.join(BIN, "rsbroker")
        # rsbroker-tls and rsbroker-ws: the same broker, its clients over
        # TLS (a self-signed certificate) or WebSocket.
        url, client = "tcp://127.0.0.1:%d" % port, []
        extra_listen = []
        if system.endswith("-quic"):
            # A tcp:// listener on the same port number, to know it is up.
            url, client = "quic://127.0.0.1:%d" % port, ["--insecure"]
            extra_listen = ["--listen", "tcp://127.0.0.1:%d" % port]
        elif system.endswith("-tls"):
            url, client = "tls://127.0.0.1:%d" % port, ["--insecure"]
        elif system.endswith("-ws"):
            url = "ws://127.0.0.1:%d/rsocket" % port
        cmd = [binary, "--listen", url] + extra_listen + ["--shards", "1", "--no-admin",
                                                          "--log", "warn"]
        if system.endswith("-tls") or system.endswith("-quic"):
            cmd += ["--config", tls_config(tmp)]
        elif "-flooded" in system:
            cmd += ["--config", flood_config(tmp, not system.endswith("-unbudgeted"))]
        if os.environ.get("RSBROKER_SPIN"):
            # To compare spin settings; the default config is what users get.
            config = os.path.join(tmp, "rsbroker.toml")
            with open(config, "w") as f:
                f.write("[server]\nspin_before_park = \"%s\"\n" % os.environ["RSBROKER_SPIN"])
            cmd += ["--config", config]
        proc = pinned(SUT_CPU, cmd)
        wait_port(port, proc, "rsbroker")
        return proc, proc.pid, ["--broker", url] + client
    if system == "nats":
        env = dict(os.environ, GOMAXPROCS="1")
        proc = pinned(SUT_CPU, [shutil.which("nats-server") or "nats-server",
                                "-a", "127.0.0.1", "-p", str(port)], env=env)
        wait_port(port, proc, "nats-server")
        return proc, proc.pid, ["--nats", "nats://127.0.0.1:%d" % port]
    if system == "direct":
        # The peer itself is the system under test: a plain RSocket responder on CPU0.
        return None, None, ["--listen", "tcp://127.0.0.1:%d" % port]
    if system in ("direct-quic", "quinn"):
        # Our responder over QUIC, or quinn's (tokio) RSocket responder.
        return None, None, ["--listen", "quic://127.0.0.1:%d" % port]
    raise SystemExit("unknown system " + system)


def run_once(name, sc, system, args, rate, tmp):
    if system == "tcp-pingpong":
        return run_pingpong(args, tmp)
    sut, sut_pid, target = start_system(system, tmp)
    responder = None
    stall = None
    if system.endswith("-stalled"):
        port = target[1].rsplit(":", 1)[1]
        stall = subprocess.Popen(["taskset", "-c", LOAD_CPU, sys.executable, "-c", STALL, port])
    flood_out = os.path.join(tmp, "flood-count")
    if "-flooded" in system:
        port = target[1].rsplit(":", 1)[1]
        stall = subprocess.Popen(["taskset", "-c", LOAD_CPU, sys.executable, "-c", FLOOD, port,
                                  flood_out, str(FLOOD_RATE)])
    try:
        extra = list(sc.get("responder", []))
        if system == "nats":
            extra = list(sc.get("nats_responder", [i for i in extra if i not in ("--instances", "16")]))
        req = [os.path.join(BIN, "loadgen"), "requester"]
        if system in DIRECT:
            # The responder is the system under test, alone on CPU0.
            resp_json = os.path.join(tmp, "responder.json")
            port = int(target[1].rsplit(":", 1)[1])
            extra = [x for x in extra if x not in ("--instances", "16")]
            if system == "quinn":
                cert, key = tls_files(tmp)
                cmd = [os.path.join(BIN, "loadgen"), "quinn-responder", "--listen", target[1],
                       "--certificate", cert, "--key", key] + extra
                resp_json = None
            else:
                cmd = [os.path.join(BIN, "loadgen"), "responder", "--listen", target[1],
                       "--json", resp_json] + extra
                if system == "direct-quic":
                    cert, key = tls_files(tmp)
                    cmd += ["--certificate", cert, "--key", key]
            responder = pinned(SUT_CPU, cmd)
            if target[1].startswith("quic://"):
                wait_udp(port, responder, " ".join(cmd[:2]))
                req += ["--broker", target[1], "--insecure"]
            else:
                wait_port(port, responder, "loadgen responder --listen")
                req += ["--broker", target[1]]
            sut_pid = responder.pid
        else:
            # The responders answer in the requester's own process, on its
            # event loop on CPU1 (--serve): two processes taking turns on one
            # CPU would measure their context switches.
            resp_json = None
            req += target + ["--serve=" + " ".join(extra)]
        req_json = os.path.join(tmp, "requester.json")
        hgrm = os.path.join(tmp, "%s-%s-%d.hgrm" % (name, system, time.monotonic_ns()))
        req += sc["requester"]
        if system != "nats":
            req += sc.get("rsocket_requester", [])
        if rate is not None:
            req += ["--rps", "%.0f" % rate]
        # loadgen has CPU1 to itself: it spins instead of parking.
        req += ["--spin", "--duration", "%gs" % args.duration, "--warmup", "%gs" % args.warmup,
                "--json", req_json, "--hgrm", hgrm, "--quiet"]
        before = cpu_ticks(sut_pid)
        t0 = time.time()
        done = subprocess.run(["taskset", "-c", LOAD_CPU] + req, capture_output=True, text=True)
        elapsed = time.time() - t0
        after = cpu_ticks(sut_pid)
        if not os.path.exists(req_json):
            raise SystemExit("requester failed: %s\n%s%s" % (" ".join(req), done.stdout, done.stderr))
        with open(req_json) as f:
            result = json.load(f)
        os.remove(req_json)
        stop(responder, signal.SIGTERM)
        responder = None
        served = result.get("served")
        if resp_json and os.path.exists(resp_json):
            with open(resp_json) as f:
                served = json.load(f)
            os.remove(resp_json)
        delivered = None
        if served:
            delivered = served["fire_and_forget"] + served["request_response"] + served["items"]
        kind = sc.get("ops", "requests")
        ops = {"requests": result["sent"], "items": result["items_total"],
               "delivered": delivered or 0}[kind]
        cpu_s = (after - before) / TICK
        flood = None
        if os.path.exists(flood_out):
            with open(flood_out) as f:
                n, secs = f.read().split()
            flood = dict(setups=int(n), per_s=int(n) / float(secs))
            os.remove(flood_out)
        return dict(
            flood=flood,
            achieved_rps=result["achieved_rps"],
            items_per_s=result["items_per_s"],
            delivered=delivered,
            delivered_per_s=(delivered / elapsed) if delivered else None,
            # Streams: per-item latency where a window makes it meaningful.
            latency_us=result["item_latency_us"]
            if kind == "items" and result["item_latency_us"]["count"] else result["latency_us"],
            lag_us=result["lag_us"],
            errors=result["errors"],
            passed=result["passed"],
            failures=result["failures"],
            sut_cpu_s=cpu_s,
            ops=ops,
            ops_kind=kind,
            sut_cpu_us_per_op=(cpu_s * 1e6 / ops) if ops else None,
            loadgen_cpu_s=result["cpu_s"],
            command=" ".join(req),
            hgrm=hgrm,
        )
    finally:
        stop(stall, signal.SIGKILL)
        stop(responder)
        stop(sut)


def run_pingpong(args, tmp):
    port = free_port()
    server = pinned(SUT_CPU, [os.path.join(BIN, "loadgen"), "pingpong", "--listen",
                              "tcp://127.0.0.1:%d" % port])
    try:
        wait_port(port, server, "pingpong")
        out = os.path.join(tmp, "pingpong.json")
        count = "2000" if args.smoke else "50000"
        subprocess.run(["taskset", "-c", LOAD_CPU, os.path.join(BIN, "loadgen"), "pingpong",
                        "--connect", "tcp://127.0.0.1:%d" % port, "--count", count,
                        "--json", out], check=True, capture_output=True)
        with open(out) as f:
            p = json.load(f)
        return dict(achieved_rps=1e6 / p["mean"] if p["mean"] else 0, latency_us=p,
                    lag_us=None, errors=0, passed=True, failures=[], sut_cpu_s=None, ops=None,
                    sut_cpu_us_per_op=None, command="loadgen pingpong")
    finally:
        stop(server, signal.SIGKILL)


# Processes whose threads are the measurement itself.
MEASURED = ("rsbroker", "loadgen", "nats-server")


def other_threads_cpu():
    """CPU time (ns) of every thread on the machine outside the measured
    processes and this script, by thread id: kernel threads (memory reclaim, compaction,
    workqueues) and other programs that take the CPUs from the run.
    ksoftirqd is left out: it mostly carries the run's own network work."""
    times = {}
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open("/proc/%s/comm" % pid) as f:
                if f.read().strip() in MEASURED:
                    continue
            for tid in os.listdir("/proc/%s/task" % pid):
                with open("/proc/%s/task/%s/comm" % (pid, tid)) as f:
                    comm = f.read().strip()
                if comm.startswith("ksoftirqd"):
                    continue
                with open("/proc/%s/task/%s/schedstat" % (pid, tid)) as f:
                    times[tid] = (comm, int(f.read().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return times


def interference(before, after):
    """Total CPU ms other threads took between two snapshots, and the three
    largest takers as "name ms"."""
    by_name = {}
    for tid, (comm, ns) in after.items():
        spent = ns - before.get(tid, (comm, 0))[1]
        if spent > 0:
            # Per-CPU kernel threads (kworker/0:2, ...) counted by family.
            name = comm.split("/")[0] if comm.startswith("kworker") else comm
            by_name[name] = by_name.get(name, 0) + spent
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:3]
    return sum(by_name.values()) / 1e6, ["%s %.0f" % (n, ns / 1e6) for n, ns in top]


def median_round(rounds, key):
    ordered = sorted(rounds, key=key)
    return ordered[len(ordered) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "perf", "results"))
    ap.add_argument("--baseline")
    ap.add_argument("--systems")
    args = ap.parse_args()
    global BASELINE
    BASELINE = args.baseline and os.path.abspath(args.baseline)
    only = args.systems.split(",") if args.systems else None
    # rsbroker and loadgen keep transparent huge pages off their heaps even
    # where the host's setting is "always" (see systemd/rsbroker.service).
    os.environ.setdefault("MIMALLOC_ALLOW_THP", "0")
    if args.smoke:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.2
    names = args.scenarios or list(SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            raise SystemExit("unknown scenario %s (%s)" % (n, ", ".join(SCENARIOS)))
    # Open-loop scenarios need the max they are a fraction of.
    for n in list(names):
        dep = SCENARIOS[n].get("rate_of")
        if dep and dep[0] not in names:
            names.insert(0, dep[0])
    os.makedirs(args.out, exist_ok=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip() != ""
    meta = dict(commit=commit + ("-dirty" if dirty else ""),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                rounds=args.rounds, duration_s=args.duration, warmup_s=args.warmup,
                nats_server=subprocess.run(["nats-server", "--version"], capture_output=True,
                                           text=True).stdout.strip(),
                cpus=os.cpu_count(), layout="system under test on CPU %s, loadgen on CPU %s"
                % (SUT_CPU, LOAD_CPU))
    summary = dict(meta=meta, scenarios={})
    maxes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            sc = SCENARIOS[name]
            entry = dict(what=sc["what"], systems={})
            systems = list(sc["systems"])
            if BASELINE:
                for s in [s for s in systems if s.startswith("rsbroker")]:
                    base = s.replace("rsbroker", "rsbroker-base", 1)
                    systems.insert(systems.index(s) + 1, base)
            if only:
                systems = [s for s in systems if s in only]
            rates = {}
            for system in systems:
                rates[system] = None
                if sc.get("rate_of"):
                    base, frac = sc["rate_of"]
                    rates[system] = maxes[(base, system)] * frac
            # Rounds alternate between the systems (A B C A B C ...): this
            # VM's speed drifts by several percent over minutes, and a ratio
            # between systems measured minutes apart would carry that drift.
            all_rounds = {system: [] for system in systems}
            for i in range(args.rounds):
                for system in systems:
                    before = other_threads_cpu()
                    r = run_once(name, sc, system, args, rates[system], tmp)
                    r["others_cpu_ms"], r["others_top"] = interference(before, other_threads_cpu())
                    all_rounds[system].append(r)
                    print("%-18s %-12s round %d: %s" % (name, system, i + 1, brief(r)), flush=True)
            for system in systems:
                rate, rounds = rates[system], all_rounds[system]
                # Closed loops: the median by throughput. Open loops send at
                # the same rate every round, so the median is by p99 latency
                # (a rate that differs in the last digit would pick the round).
                key = (lambda r: r["items_per_s"]) if sc.get("ops") == "items" else \
                      (lambda r: r["delivered_per_s"] or 0) if sc.get("ops") == "delivered" else \
                      (lambda r: r["latency_us"].get("p99") or 0) if rate is not None else \
                      (lambda r: r["achieved_rps"])
                med = median_round(rounds, key)
                # The median round's histogram is the one kept.
                hgrm = os.path.join(args.out, "%s-%s.hgrm" % (name, system))
                if med.get("hgrm") and os.path.exists(med["hgrm"]):
                    shutil.copyfile(med["hgrm"], hgrm)
                for r in rounds:
                    r["hgrm"] = os.path.basename(hgrm) if r is med else None
                maxes[(name, system)] = med["achieved_rps"]
                entry["systems"][system] = dict(median=med, rounds=rounds, target_rps=rate)
            summary["scenarios"][name] = entry
            with open(os.path.join(args.out, name + ".json"), "w") as f:
                json.dump(dict(meta=meta, **entry), f, indent=1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown(summary))
    print(markdown(summary))


def brief(r):
    parts = ["%.0f/s" % r["achieved_rps"]]
    if r.get("items_per_s"):
        parts.append("%.0f items/s" % r["items_per_s"])
    if r.get("delivered_per_s"):
        parts.append("%.0f delivered/s" % r["delivered_per_s"])
    lat = r["latency_us"]
    parts.append("p50 %.0f p99 %.0f µs" % (lat["p50"], lat["p99"]))
    if r.get("sut_cpu_us_per_op") is not None:
        parts.append("%.2f µs CPU/%s" % (r["sut_cpu_us_per_op"], r["ops_kind"][:-1]))
    if r.get("flood"):
        parts.append("flood %.0f SETUPs/s" % r["flood"]["per_s"])
    if r.get("others_cpu_ms") is not None:
        parts.append("others %.0f ms CPU (%s)" % (r["others_cpu_ms"], ", ".join(r["others_top"])))
    if r.get("failures"):
        parts.append("FAIL: " + "; ".join(r["failures"]))
    return ", ".join(parts)


def targets(summary):
    """The issue's targets, each as (what, measured, passed)."""
    sc = summary["scenarios"]

    def med(name, system):
        s = sc.get(name, {}).get("systems", {}).get(system)
        return s["median"] if s else None

    out = []
    rb = med("rr-max", "rsbroker")
    for system, label, floor in (("rsbroker-tls", "TLS", 0.8), ("rsbroker-ws", "WebSocket", 0.9)):
        other = med("rr-max", system)
        if rb and other:
            ratio = other["achieved_rps"] / max(rb["achieved_rps"], 1)
            out.append(("rr-max over %s: requests/s >= %.1fx TCP's" % (label, floor),
                        "%.2fx (%.0f vs %.0f/s)" % (ratio, other["achieved_rps"], rb["achieved_rps"]),
                        ratio >= floor))
            if label == "TLS":
                cpu = (other["sut_cpu_us_per_op"] or 0) / max(rb["sut_cpu_us_per_op"] or 0, 1e-9)
                out.append(("rr-max over TLS: broker CPU per request <= 1.5x TCP's",
                            "%.2fx (%.2f vs %.2f µs)" % (cpu, other["sut_cpu_us_per_op"] or 0,
                                                       rb["sut_cpu_us_per_op"] or 0), cpu <= 1.5))
    rb, rq = med("rr-max", "rsbroker"), med("rr-max", "rsbroker-quic")
    if rb and rq:
        ratio = rq["achieved_rps"] / max(rb["achieved_rps"], 1)
        out.append(("rr-max over QUIC: requests/s >= 0.5x TCP's",
                    "%.2fx (%.0f vs %.0f/s)" % (ratio, rq["achieved_rps"], rb["achieved_rps"]),
                    ratio >= 0.5))
    for name, rate in (("rr-max", "achieved_rps"), ("stream-unbounded", "items_per_s"),
                       ("stream-64k", "items_per_s")):
        dq, qn = med(name, "direct-quic"), med(name, "quinn")
        if dq and qn:
            ratio = dq[rate] / max(qn[rate], 1)
            cpu_d, cpu_q = dq["sut_cpu_us_per_op"] or 0, qn["sut_cpu_us_per_op"] or 0
            out.append(("%s, direct QUIC: frames/s >= 1.0x quinn's at no more CPU per frame" % name,
                        "%.2fx (%.0f vs %.0f/s), %.2f vs %.2f µs CPU/frame"
                        % (ratio, dq[rate], qn[rate], cpu_d, cpu_q),
                        ratio >= 1.0 and cpu_d <= cpu_q))
    rb, nt = med("rr-max", "rsbroker"), med("rr-max", "nats")
    if rb and nt:
        ratio = rb["achieved_rps"] / max(nt["achieved_rps"], 1)
        out.append(("rr-max: requests/s >= 3x nats-server", "%.2fx (%.0f vs %.0f/s)"
                    % (ratio, rb["achieved_rps"], nt["achieved_rps"]), ratio >= 3))
        cpu = rb["sut_cpu_us_per_op"] or 0
        out.append(("rr-max: broker CPU <= 1.0 µs/request", "%.2f µs (nats-server %.2f µs, %.2fx less)"
                    % (cpu, nt["sut_cpu_us_per_op"] or 0, (nt["sut_cpu_us_per_op"] or 0) / max(cpu, 1e-9)),
                    cpu <= 1.0))
    st, direct = med("stream-unbounded", "rsbroker"), med("stream-unbounded", "direct")
    if st:
        out.append(("stream-unbounded: >= 2.1 M items/s", "%.2f M items/s (direct %.2f M)"
                    % (st["items_per_s"] / 1e6, (direct or {}).get("items_per_s", 0) / 1e6),
                    st["items_per_s"] >= 2.1e6))
    rb, nt = med("fanout-16", "rsbroker"), med("fanout-16", "nats")
    if rb and nt:
        out.append(("fanout-16: delivered/s >= nats-server", "%.2fx (%.0f vs %.0f/s)"
                    % ((rb["delivered_per_s"] or 0) / max(nt["delivered_per_s"] or 1, 1),
                       rb["delivered_per_s"] or 0, nt["delivered_per_s"] or 0),
                    (rb["delivered_per_s"] or 0) >= (nt["delivered_per_s"] or 0)))
        out.append(("fanout-16: broker CPU per delivery <= nats-server", "%.2f vs %.2f µs"
                    % (rb["sut_cpu_us_per_op"] or 0, nt["sut_cpu_us_per_op"] or 0),
                    (rb["sut_cpu_us_per_op"] or 0) <= (nt["sut_cpu_us_per_op"] or 0)))
    rb, nt, pp = (med("rr-1-in-flight", s) for s in ("rsbroker", "nats", "tcp-pingpong"))
    if rb and nt and pp:
        p50 = rb["latency_us"]["p50"]
        out.append(("rr-1-in-flight: p50 <= 2x TCP ping-pong", "%.0f µs vs %.0f µs (%.2fx)"
                    % (p50, pp["latency_us"]["p50"], p50 / max(pp["latency_us"]["p50"], 1e-9)),
                    p50 <= 2 * pp["latency_us"]["p50"]))
        out.append(("rr-1-in-flight: p50 <= nats-server p50", "%.0f µs vs %.0f µs"
                    % (p50, nt["latency_us"]["p50"]), p50 <= nt["latency_us"]["p50"]))
    rb = med("rr-open-50", "rsbroker")
    if rb:
        lat = rb["latency_us"]
        out.append(("rr-open-50: p99 < 1.1 ms, p99.9 < 3 ms", "p99 %.0f µs, p99.9 %.0f µs at %.0f/s"
                    % (lat["p99"], lat["p999"], rb["achieved_rps"]),
                    lat["p99"] < 1100 and lat["p999"] < 3000 and rb["passed"]))
    rb = med("stream-64k", "rsbroker")
    if rb:
        gbit = rb["items_per_s"] * 65536 * 8 / 1e9
        out.append(("stream-64k: >= 8 Gbit/s", "%.1f Gbit/s" % gbit, gbit >= 8))
    return out


def markdown(summary):
    m = summary["meta"]
    out = ["Commit `%s`, %s; %s; %d round(s) of %gs (+%gs warm-up), rounds alternating between "
           "the systems, median round shown; %s. \"others ms\": CPU time other threads on the "
           "machine (kernel reclaim, workqueues, other programs) took during that round.\n"
           % (m["commit"], m["date"], m["layout"], m["rounds"], m["duration_s"], m["warmup_s"],
              m["nats_server"])]
    out.append("| scenario | system | rate | items/s | delivered/s | p50 µs | p99 µs | p99.9 µs | CPU µs/op | others ms |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, e in summary["scenarios"].items():
        for system, s in e["systems"].items():
            r = s["median"]
            lat = r["latency_us"]
            cpu = r.get("sut_cpu_us_per_op")
            out.append("| %s | %s | %s | %s | %s | %.0f | %.0f | %.0f | %s | %s |" % (
                name, system,
                "%.0f/s" % r["achieved_rps"] + (" (target %.0f)" % s["target_rps"] if s["target_rps"] else ""),
                "%.0f" % r["items_per_s"] if r.get("items_per_s") else "",
                "%.0f" % r["delivered_per_s"] if r.get("delivered_per_s") else "",
                lat["p50"], lat["p99"], lat["p999"],
                "%.2f" % cpu if cpu is not None else "",
                "%.0f" % r["others_cpu_ms"] if r.get("others_cpu_ms") is not None else ""))
    t = targets(summary)
    if t:
        out.append("\n| target | measured | met |")
        out.append("|---|---|---|")
        for what, measured, ok in t:
            out.append("| %s | %s | %s |" % (what, measured, "yes" if ok else "**no**"))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
