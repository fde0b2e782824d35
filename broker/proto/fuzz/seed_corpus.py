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

# The shard target reads a program: a config byte, then steps of an op
# byte, a connection slot byte (slot i is on shard i % shards) and the op's
# arguments; see fuzz_targets/shard.rs.
SETUP, REQUEST, PAYLOAD, REQUEST_N, CANCEL, ERROR = 0, 2, 6, 7, 8, 9
PUSH, TIME, TRANSPORT, DELIVER, CLOSE = 10, 13, 14, 15, 16


def register(slot, uuid, services):
    # app with a name and power rating, a registry of `services` (pool indices)
    # (keepalive byte 9: a lifetime of 10 s)
    return bytes([SETUP, slot, 1 | 4, 9, uuid, 1, len(services), *services])


def requester(slot):
    return bytes([SETUP, slot, 0, 0, 0, 0])


def deliver(shards=2):
    return b"".join(bytes([DELIVER, 0, q, 7]) for q in range(shards * shards)) * 2


def request(slot, kind, stream, route, n=3, extra=0, uuid=0):
    # kind: 0 request-response, 1 fire-and-forget, 2 stream, 3 channel;
    # extra: 1 e=UUIDS[uuid], 2 sticky, 4 broadcast, 8 hash tag, 16 bearer
    endpoint = [uuid] if extra & 1 else []
    return bytes([REQUEST, slot, kind | (min(n, 7) << 5), stream, 0, route, extra, *endpoint, 2])


def payload(slot, stream, flags):
    # flags: 1 follows, 2 complete, 4 next, 8 metadata; high nibble: data size / 8
    return bytes([PAYLOAD, slot, stream, flags])


shard_seeds = {
    "request-response": b"\x00" + register(1, 0, [0, 2]) + requester(0) + deliver()
    + request(0, 0, 1, 0) + deliver() + payload(1, 2, 6) + deliver(),
    "stream-and-cancel": b"\x00" + register(1, 1, [1]) + requester(0) + deliver()
    + request(0, 2, 3, 2) + deliver() + payload(1, 2, 4) + payload(1, 2, 4) + deliver()
    + bytes([REQUEST_N, 0, 3, 5]) + deliver() + bytes([CANCEL, 0, 3]) + deliver(),
    "channel-same-shard": b"\x00" + register(0, 0, [0]) + requester(2) + deliver()
    + request(2, 3, 1, 1) + deliver() + payload(2, 1, 4) + payload(0, 2, 6) + deliver()
    + payload(2, 1, 2) + deliver(),
    "slow-consumer": b"\x10" + register(1, 0, [2]) + requester(0) + deliver()
    + bytes([TRANSPORT, 0, 0]) + request(0, 2, 1, 4, n=1) + deliver()
    + payload(1, 2, 0x74) * 8 + deliver() + bytes([TIME, 0, 60]) + deliver()
    + bytes([TRANSPORT, 0, 0]) + deliver(),
    "sticky-endpoint-broadcast": b"\x08" + register(1, 0, [0]) + register(3, 1, [0])
    + register(5, 1, [0]) + requester(0) + deliver()
    + request(0, 0, 1, 0, extra=1 | 2, uuid=1) + request(0, 1, 3, 0, extra=4) + deliver()
    + bytes([CLOSE, 1, 0]) + deliver() + bytes([TIME, 0, 0x85]) + deliver(),
    "events": b"\x00" + register(1, 0, [0]) + requester(0) + deliver()
    + bytes([PUSH, 1, 1, 1, 1, 0]) + deliver() + request(0, 0, 1, 0) + deliver()
    + bytes([PUSH, 1, 2 | 4, 2, 2]) + deliver() + bytes([PUSH, 1, 0, 0, 2, 1, 3]) + deliver()
    + request(0, 0, 3, 2) + deliver() + bytes([ERROR, 1, 2, 0]) + deliver(),
    "three-shards": b"\x80" + register(2, 0, [0]) + register(4, 1, [0]) + requester(0)
    + deliver(3) + request(0, 0, 1, 1) + request(0, 0, 3, 1) + deliver(3)
    + payload(2, 2, 6) + payload(4, 2, 6) + deliver(3) + bytes([CLOSE, 2, 0]) + deliver(3),
}
os.makedirs(os.path.join(here, "corpus", "shard"), exist_ok=True)
for name, data in shard_seeds.items():
    with open(os.path.join(here, "corpus", "shard", name), "wb") as out:
        out.write(data)
