"""rsocket-py against a broker that requires JWTs: signs RS256 tokens with
PyJWT (the broker holds the public key), registers an app the way
alibaba-rsocket-broker clients do (app metadata, published services and a
bearer token in the SETUP's composite metadata), calls it with a second
connection whose token travels as authentication metadata, and checks
that the same token tampered with is refused. Prints one `OK <check>` line
per check and exits 0; prints `FAIL ...` and exits 1 otherwise.

usage: auth.py HOST PORT PRIVATE_KEY_PEM
"""
import asyncio
import json
import sys
import time

import jwt

from rsocket.extensions.helpers import authenticate_bearer, composite, metadata_item, route
from rsocket.error_codes import ErrorCode
from rsocket.exceptions import RSocketProtocolError
from rsocket.extensions.mimetypes import WellKnownMimeTypes
from rsocket.helpers import create_future
from rsocket.payload import Payload
from rsocket.routing.request_router import RequestRouter
from rsocket.routing.routing_request_handler import RoutingRequestHandler
from rsocket.rsocket_client import RSocketClient
from rsocket.transports.tcp import TransportTCP

SERVICE = "com.example.PyAuth"


def fail(message):
    print("FAIL " + message, flush=True)
    sys.exit(1)


def token(key, sub):
    now = int(time.time())
    claims = {"sub": sub, "iss": "test-issuer", "aud": "rsbroker", "iat": now, "exp": now + 300}
    return jwt.encode(claims, key, algorithm="RS256")


async def connect(host, port, setup, handler=None):
    reader, writer = await asyncio.open_connection(host, port)
    kwargs = {}
    if handler is not None:
        kwargs["handler_factory"] = handler
    return RSocketClient(
        single(TransportTCP(reader, writer)),
        metadata_encoding=WellKnownMimeTypes.MESSAGE_RSOCKET_COMPOSITE_METADATA,
        data_encoding=WellKnownMimeTypes.APPLICATION_OCTET_STREAM,
        setup_payload=Payload(metadata=setup),
        **kwargs,
    )


async def single(transport):
    yield transport


async def main(host, port, key_file):
    key = open(key_file, "rb").read()

    router = RequestRouter()

    @router.response(SERVICE + ".hello")
    async def hello(payload, composite_metadata):
        return create_future(Payload(b"py-auth:" + payload.data))

    # The alibaba-style SETUP: app metadata, its services, and the token
    # as message/x.rsocket.authentication.bearer.v0.
    app = json.dumps({"name": "py-auth", "uuid": "py-auth-1", "ip": "127.0.0.1"}).encode()
    registry = json.dumps({"published": [{"group": "", "service": SERVICE, "version": ""}]}).encode()
    setup = composite(
        metadata_item(app, b"message/x.rsocket.application+json"),
        metadata_item(registry, b"message/x.rsocket.service.registry.v0+json"),
        metadata_item(token(key, "py-responder").encode(), b"message/x.rsocket.authentication.bearer.v0"),
    )
    async with await connect(host, port, setup, lambda: RoutingRequestHandler(router)):
        print("OK alibaba-style SETUP with a bearer token", flush=True)
        # A requester whose token travels as authentication metadata (bearer).
        good = token(key, "py-requester")
        async with await connect(host, port, composite(authenticate_bearer(good))) as client:
            answer = None
            for _ in range(50):
                try:
                    answer = await asyncio.wait_for(
                        client.request_response(Payload(b"hi", composite(route(SERVICE + ".hello")))), 5
                    )
                    break
                except Exception as e:  # the registration may not have reached its shard yet
                    if "no live instance" not in str(e):
                        fail("request with a good token: {!r}".format(e))
                    await asyncio.sleep(0.05)
            if answer is None or answer.data != b"py-auth:hi":
                fail("request with a good token: {!r}".format(answer))
            print("OK RS256 token from PyJWT accepted", flush=True)

        # The same token with one character of its signature changed.
        head, body, sig = good.split(".")
        sig = ("A" if sig[0] != "A" else "B") + sig[1:]
        tampered = ".".join([head, body, sig])
        try:
            async with await connect(host, port, composite(authenticate_bearer(tampered))) as client:
                await asyncio.wait_for(
                    client.request_response(Payload(b"hi", composite(route(SERVICE + ".hello")))), 5
                )
            fail("a tampered token was let in")
        except RSocketProtocolError as e:
            # rsocket-py reports the broker's ERROR REJECTED_SETUP as the
            # connection's error to the pending request.
            if e.error_code not in (ErrorCode.REJECTED_SETUP, ErrorCode.CONNECTION_ERROR):
                fail("tampered token: unexpected error {!r}".format(e))
        print("OK tampered token refused", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        fail(__doc__)
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2], sys.argv[3]), 60))
    except SystemExit:
        raise
    except BaseException as e:
        fail("{!r}".format(e))
