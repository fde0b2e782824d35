"""An rsocket-py requester that calls com.example.Echo through rsbroker in all
four interaction models and checks each answer. Exits 0 when all pass,
printing one `OK <check>` line per check; on a failure, or when the whole
run takes longer than --timeout seconds, prints `FAIL ...` and exits 1.

usage: requester.py HOST PORT
       requester.py URL [--ca FILE] [--alpn PROTO] [--timeout SECONDS]

URL is tcp://HOST:PORT, tls://HOST:PORT, ws://HOST:PORT/PATH or
wss://HOST:PORT/PATH or quic://HOST:PORT; --ca is a PEM CA certificate to
trust for tls/wss/quic, --alpn an ALPN protocol for quic.
"""
import argparse
import asyncio
import sys
import traceback

from rsocket.awaitable.awaitable_rsocket import AwaitableRSocket
from rsocket.extensions.helpers import composite, route
from rsocket.extensions.mimetypes import WellKnownMimeTypes
from rsocket.payload import Payload
from rsocket.rsocket_client import RSocketClient
from rsocket.streams.stream_from_generator import StreamFromGenerator

from interop_transport import open_transport, single, target_url

SERVICE = "com.example.Echo"


def check(name, got, want):
    if got != want:
        print("FAIL {}: got {!r}, want {!r}".format(name, got, want), flush=True)
        sys.exit(1)
    print("OK " + name, flush=True)


async def main(url, ca, alpn):
    transport = await open_transport(url, ca, alpn)

    async with RSocketClient(
        single(transport),
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

        # The same with a window of 1: every item waits for its REQUEST_N.
        items = await client.request_stream(Payload(b"4", composite(route(SERVICE + ".count"))), limit_rate=1)
        check("request-stream window 1", [p.data for p in items], [str(i).encode() for i in range(4)])

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


def parse_args(argv):
    parser = argparse.ArgumentParser(description="rsocket-py requester for the rsbroker interop tests")
    parser.add_argument("target", nargs="+", metavar="ADDRESS", help="URL, or HOST PORT for plain TCP")
    parser.add_argument("--ca", metavar="FILE", help="PEM CA certificate to trust (tls://, wss://, quic://)")
    parser.add_argument("--alpn", metavar="PROTO", help="ALPN protocol a quic:// connection offers")
    parser.add_argument("--timeout", type=float, default=45, metavar="SECONDS",
                        help="give up after this long (default 45)")
    args = parser.parse_intermixed_args(argv)
    try:
        args.url, rest = target_url(args.target)
    except ValueError as e:
        parser.error(str(e))
    if rest:
        parser.error("unexpected arguments: " + " ".join(rest))
    return args


async def run(args):
    try:
        await asyncio.wait_for(main(args.url, args.ca, args.alpn), args.timeout)
    except asyncio.TimeoutError:
        print("FAIL timeout: not done after {}s".format(args.timeout), flush=True)
        sys.exit(1)
    except Exception as e:
        traceback.print_exc()
        print("FAIL {}: {}".format(type(e).__name__, e), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(run(parse_args(sys.argv[1:])))
