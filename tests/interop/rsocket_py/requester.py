"""An rsocket-py requester that calls com.example.Echo through rsbroker in all
four interaction models and checks each answer. Exits 0 when all pass,
printing one `OK <check>` line per check.

usage: requester.py HOST PORT
"""
import asyncio
import sys

from rsocket.awaitable.awaitable_rsocket import AwaitableRSocket
from rsocket.extensions.helpers import composite, route
from rsocket.extensions.mimetypes import WellKnownMimeTypes
from rsocket.payload import Payload
from rsocket.rsocket_client import RSocketClient
from rsocket.streams.stream_from_generator import StreamFromGenerator
from rsocket.transports.tcp import TransportTCP

SERVICE = "com.example.Echo"


def check(name, got, want):
    if got != want:
        print("FAIL {}: got {!r}, want {!r}".format(name, got, want), flush=True)
        sys.exit(1)
    print("OK " + name, flush=True)


async def main(host, port):
    reader, writer = await asyncio.open_connection(host, port)

    async def transport():
        yield TransportTCP(reader, writer)

    async with RSocketClient(
        transport(),
        metadata_encoding=WellKnownMimeTypes.MESSAGE_RSOCKET_COMPOSITE_METADATA,
        data_encoding=WellKnownMimeTypes.APPLICATION_OCTET_STREAM,
        fragment_size_bytes=64,
    ) as raw:
        client = AwaitableRSocket(raw)

        answer = await client.request_response(Payload(b"hi", composite(route(SERVICE + ".echo"))))
        check("request-response", answer.data, b"echo:hi")

        # 300 bytes with 64-byte fragments: fragmented through the broker both ways.
        big = b"Z" * 300
        answer = await client.request_response(Payload(big, composite(route(SERVICE + ".echo"))))
        check("fragmented request-response", answer.data, b"echo:" + big)

        await client.fire_and_forget(Payload(b"note-1", composite(route(SERVICE + ".log"))))
        check("fire-and-forget sent", True, True)

        # request-stream with a window of 2: REQUEST_N flows end to end.
        items = await client.request_stream(Payload(b"7", composite(route(SERVICE + ".count"))), limit_rate=2)
        check("request-stream", [p.data for p in items], [str(i).encode() for i in range(7)])

        def outgoing():
            for i in range(3):
                yield Payload("c{}".format(i).encode()), i == 2

        items = await client.request_channel(
            Payload(b"start", composite(route(SERVICE + ".chat"))),
            StreamFromGenerator(outgoing),
            limit_rate=10,
        )
        check("request-channel", [p.data for p in items], [b"chat:start", b"chat:c0", b"chat:c1", b"chat:c2"])

        # A service the responder announced over METADATA_PUSH.
        answer = await client.request_response(Payload(b"there", composite(route(SERVICE + "Extra.hello"))))
        check("service exposed by METADATA_PUSH", answer.data, b"extra:there")

        try:
            await client.request_response(Payload(b"x", composite(route("com.example.Missing.call"))))
            check("no instance", "answered", "REJECTED")
        except Exception as e:
            check("no instance rejected", "com.example.Missing" in str(e), True)

        # An event the broker does not act on: ignored, the connection stays up.
        await raw.metadata_push(b'{"type":"com.example.Unrelated","data":{}}')
        answer = await client.request_response(Payload(b"after", composite(route(SERVICE + ".echo"))))
        check("metadata push from a requester", answer.data, b"echo:after")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
