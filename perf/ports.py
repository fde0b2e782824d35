"""Loopback ports for the perf scripts: a free one, and waiting until a
started process listens on one."""
import socket
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=20):
    """Returns once 127.0.0.1:port takes a connection; exits the script if
    proc ends first (saying what it wrote to a piped stderr) or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            said = proc.stderr.read() if proc.stderr else ""
            raise SystemExit("%s exited: %s %s" % (what, proc.args, said))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("%s did not listen on %d" % (what, port))
