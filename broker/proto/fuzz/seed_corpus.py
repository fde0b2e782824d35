#!/usr/bin/env python3
"""Seeds the fuzz corpora from the rsocket-py capture in ../tests/data."""
import os

here = os.path.dirname(os.path.abspath(__file__))
capture = os.path.join(here, "..", "tests", "data", "rsocket-py-0.4.20.txt")
lines = [l for l in open(capture) if not l.startswith("#") and l.strip()]
frames = [(l.split()[0], bytes.fromhex(l.split()[1])) for l in lines]


def prefixed(frame):
    return len(frame).to_bytes(3, "big") + frame


os.makedirs(os.path.join(here, "corpus", "frame"), exist_ok=True)
os.makedirs(os.path.join(here, "corpus", "connection"), exist_ok=True)
for i, (_, f) in enumerate(frames):
    with open(os.path.join(here, "corpus", "frame", f"capture-{i:02}"), "wb") as out:
        out.write(f)
to_server = b"".join(prefixed(f) for d, f in frames if d == "client->server")
to_client = b"".join(prefixed(f) for d, f in frames if d == "server->client")
# mode byte, number of choice bytes, choice bytes, then the byte stream
seeds = {
    "server": bytes([0, 4, 0, 1, 2, 3]) + to_server,
    "server-reassembling": bytes([1 | 64, 3, 5, 6, 7]) + to_server,
    "client": bytes([8, 2, 9, 4]) + to_client,
}
for name, data in seeds.items():
    with open(os.path.join(here, "corpus", "connection", name), "wb") as out:
        out.write(data)
