"""An rsocket-py app that registers com.example.Echo with rsbroker and answers
all four interaction models. Prints READY once connected, and each
fire-and-forget it receives as `FNF <data>`.

usage: responder.py HOST PORT UUID
       responder.py URL UUID [--ca FILE] [--alpn PROTO]

URL is tcp://HOST:PORT, tls://HOST:PORT, ws://HOST:PORT/PATH or
wss://HOST:PORT/PATH or quic://HOST:PORT; --ca is a PEM CA certificate to
trust for tls/wss/quic, --alpn an ALPN protocol for quic.
"""
import argparse
import asyncio
import json
import sys

from rsocket.extensions.helpers import composite, metadata_item
from rsocket.extensions.mimetypes import WellKnownMimeTypes
from rsocket.helpers import create_future
from rsocket.payload import Payload
from rsocket.routing.request_router import RequestRouter
from rsocket.routing.routing_request_handler import RoutingRequestHandler
from rsocket.rsocket_client import RSocketClient
from rsocket.streams.stream_from_generator import StreamFromGenerator
from reactivestreams.subscriber import DefaultSubscriber

from interop_transport import open_transport, single, target_url

SERVICE = "com.example.Echo"


def make_router():
    router = RequestRouter()

    @router.response(SERVICE + ".echo")
    async def echo(payload: Payload, composite_metadata):
        return create_future(Payload(b"echo:" + payload.data))

    @router.response(SERVICE + "Extra.hello")
    async def extra(payload: Payload, composite_metadata):
        return create_future(Payload(b"extra:" + payload.data))

    @router.fire_and_forget(SERVICE + ".log")
    async def log(payload: Payload, composite_metadata):
        print("FNF " + payload.data.decode(), flush=True)

    @router.stream(SERVICE + ".count")
    async def count(payload: Payload, composite_metadata):
        n = int(payload.data.decode())

        def items():
            for i in range(n):
                yield Payload(str(i).encode()), i == n - 1

        return StreamFromGenerator(items)

    @router.channel(SERVICE + ".chat")
    async def chat(payload: Payload, composite_metadata):
        # Echo every item the requester sends, then complete when it does.
        from rsocket.streams.stream_from_async_generator import StreamFromAsyncGenerator

        queue = asyncio.Queue()
        queue.put_nowait((payload, False))

        class Echo(DefaultSubscriber):
            def on_next(self, value, is_complete=False):
                queue.put_nowait((value, False))
                if is_complete:
                    queue.put_nowait((None, True))

            def on_complete(self):
                queue.put_nowait((None, True))

            def on_subscribe(self, subscription):
                super().on_subscribe(subscription)
                subscription.request(100)

        async def generator():
            while True:
                item, done = await queue.get()
                if done:
                    return
                yield Payload(b"chat:" + item.data), False

        return StreamFromAsyncGenerator(generator), Echo()

    return router


async def main(url, uuid, ca, alpn):
    app = json.dumps({"name": "py-echo", "uuid": uuid, "ip": "127.0.0.1"}).encode()
    registry = json.dumps({"published": [{"group": "", "service": SERVICE, "version": ""}]}).encode()
    setup = composite(
        metadata_item(app, b"message/x.rsocket.application+json"),
        metadata_item(registry, b"message/x.rsocket.service.registry.v0+json"),
    )
    transport = await open_transport(url, ca, alpn)

    router = make_router()
    async with RSocketClient(
        single(transport),
        handler_factory=lambda: RoutingRequestHandler(router),
        metadata_encoding=WellKnownMimeTypes.MESSAGE_RSOCKET_COMPOSITE_METADATA,
        data_encoding=WellKnownMimeTypes.APPLICATION_OCTET_STREAM,
        setup_payload=Payload(metadata=setup),
    ) as client:
        # METADATA_PUSH: publish one more service, as alibaba clients do.
        exposed = json.dumps({
            "specversion": "1.0",
            "id": "1",
            "source": "app://" + uuid,
            "type": "com.alibaba.rsocket.events.ServicesExposedEvent",
            "datacontenttype": "application/json",
            "data": {"appId": uuid, "services": [{"group": "", "service": SERVICE + "Extra", "version": ""}]},
        }).encode()
        await client.metadata_push(exposed)
        print("READY", flush=True)
        # Serve until stdin closes.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="rsocket-py responder for the rsbroker interop tests")
    parser.add_argument("target", nargs="+", metavar="ARG", help="URL UUID, or HOST PORT UUID for plain TCP")
    parser.add_argument("--ca", metavar="FILE", help="PEM CA certificate to trust (tls://, wss://, quic://)")
    parser.add_argument("--alpn", metavar="PROTO", help="ALPN protocol a quic:// connection offers")
    args = parser.parse_intermixed_args(argv)
    try:
        args.url, rest = target_url(args.target)
    except ValueError as e:
        parser.error(str(e))
    if len(rest) != 1:
        parser.error("want exactly one UUID after the address")
    args.uuid = rest[0]
    return args


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    asyncio.run(main(args.url, args.uuid, args.ca, args.alpn))
