"""Where the interop scripts connect: a transport URL, or HOST PORT (plain TCP).

    tcp://HOST:PORT           TCP (rsocket-py's TransportTCP)
    tls://HOST:PORT           TCP in TLS (TransportTCP over an ssl stream)
    ws://HOST:PORT/PATH       WebSocket (rsocket-py's WebsocketsTransport, on
    wss://HOST:PORT/PATH      the `websockets` package), plain or in TLS
    quic://HOST:PORT          QUIC (rsocket-py's aioquic transport): frames
                              length-prefixed on one bidirectional stream

For tls://, wss:// and quic://, `--ca FILE` names a PEM CA certificate to trust
instead of the system's; the server's name is checked against HOST either way.
For quic://, `--alpn PROTO` offers an ALPN protocol (none by default, as
rsocket-py's own default).
"""
import asyncio
import ssl
from urllib.parse import urlsplit

from rsocket.exceptions import RSocketTransportError
from rsocket.transports.tcp import TransportTCP
from rsocket.transports.websockets_transport import WebsocketsTransport

SCHEMES = ("tcp", "tls", "ws", "wss", "quic")
CONNECT_TIMEOUT = 10


def target_url(positional):
    """Splits the positional arguments into (url, rest): the first is a URL
    when it has a scheme, otherwise HOST PORT make a tcp:// URL."""
    if positional and "://" in positional[0]:
        url, rest = positional[0], positional[1:]
    elif len(positional) >= 2:
        host, port = positional[0], positional[1]
        if ":" in host and not host.startswith("["):
            host = "[" + host + "]"
        url, rest = "tcp://{}:{}".format(host, int(port)), positional[2:]
    else:
        raise ValueError("need a URL or HOST PORT")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError("unsupported scheme {!r} in {!r} (want one of {})".format(
            parts.scheme, url, ", ".join(SCHEMES)))
    if not parts.hostname or not parts.port:
        raise ValueError("{!r} needs a host and a port".format(url))
    return url, rest


def ssl_context(ca):
    # With cafile given, only that CA is trusted; hostname checks stay on.
    return ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()


class WebsocketsClientTransport(WebsocketsTransport):
    """rsocket-py's WebsocketsTransport (written for `websockets.serve`) run
    on a client connection: one WebSocket binary message per frame. Adds
    what a client needs: start the pumps on connect, report a closed socket
    to the RSocket as a transport error, close the socket on close."""

    def __init__(self, websocket):
        super().__init__()
        self._ws = websocket
        self._pump = None

    async def connect(self):
        self._pump = asyncio.create_task(self._run())

    async def _run(self):
        try:
            await self.handler(self._ws)
        except asyncio.CancelledError:
            raise
        except Exception:
            pass
        # The socket is gone: wake the RSocket's reader instead of leaving it
        # waiting forever.
        self._incoming_frame_queue.put_nowait(RSocketTransportError("websocket closed"))

    async def close(self):
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass
        await self._ws.close()


async def open_quic(parts, ca, alpn):
    """rsocket-py's QUIC client transport, kept open until the transport
    closes (rsocket_connect is a context manager)."""
    from aioquic.quic.configuration import QuicConfiguration
    from rsocket.transports.aioquic_transport import rsocket_connect

    configuration = QuicConfiguration(
        is_client=True,
        server_name=parts.hostname,
        alpn_protocols=[alpn] if alpn else None,
    )
    if ca:
        configuration.load_verify_locations(ca)
    context = rsocket_connect(parts.hostname, parts.port, configuration=configuration)
    transport = await asyncio.wait_for(context.__aenter__(), CONNECT_TIMEOUT)
    # aioquic hands the stream of the first data received to a handler that
    # drops its asyncio StreamWriter; since Python 3.11.5 a dropped writer
    # closes itself, which finishes the client's side of the very stream
    # rsocket-py sends on. Keep the writers, as an application would.
    kept = []
    transport._quic_protocol._stream_handler = lambda reader, writer: kept.append(writer)
    close = transport.close

    async def close_and_exit():
        await close()
        try:
            await context.__aexit__(None, None, None)
        except Exception:
            pass

    transport.close = close_and_exit
    return transport


async def open_transport(url, ca=None, alpn=None):
    """Connects to url and returns an rsocket-py Transport on it."""
    parts = urlsplit(url)
    if parts.scheme == "quic":
        return await open_quic(parts, ca, alpn)
    if parts.scheme in ("tcp", "tls"):
        context = ssl_context(ca) if parts.scheme == "tls" else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port, ssl=context),
            CONNECT_TIMEOUT,
        )
        return TransportTCP(reader, writer)

    from websockets.asyncio.client import connect

    options = {}
    if parts.scheme == "wss":
        options["ssl"] = ssl_context(ca)
    websocket = await connect(
        url,
        open_timeout=CONNECT_TIMEOUT,
        compression=None,  # RSocket frames as they are, no permessage-deflate
        ping_interval=None,  # RSocket has its own keepalive
        max_size=16 * 1024 * 1024,  # an RSocket frame's maximum
        **options,
    )
    return WebsocketsClientTransport(websocket)


def single(transport):
    """The transport provider RSocketClient wants: yields one transport."""

    async def provider():
        yield transport

    return provider()
