'use strict';
// An rsocket-js 0.0.27 requester: connects over WebSocket, SETUPs like
// ../rsocket_py/requester.py and calls com.example.Echo in all four
// interaction models, printing one `OK <model>` line per check. Any failure,
// or not being done within 15 s, prints `FAIL ...` and exits 1.
//
// usage: node requester-0.0.27.js ws://HOST:PORT/PATH [--ca FILE]

const WebSocket = require('ws');
const {
  RSocketClient,
  BufferEncoders,
  MESSAGE_RSOCKET_ROUTING,
  encodeCompositeMetadata,
  encodeRoute,
} = require('rsocket-core-0.0.27');
const RSocketWebSocketClient = require('rsocket-websocket-client-0.0.27').default;
const {Flowable} = require('rsocket-flowable-0.0.27');
const c = require('./common');

const NOTE = 'note-js-0.0.27';

function route(method) {
  return encodeCompositeMetadata([
    [MESSAGE_RSOCKET_ROUTING, encodeRoute(c.SERVICE + '.' + method)],
  ]);
}

function payload(data, method) {
  const p = {data: Buffer.from(data)};
  if (method) {
    p.metadata = route(method);
  }
  return p;
}

function single(s) {
  return new Promise((resolve, reject) => {
    s.subscribe({onComplete: resolve, onError: reject});
  });
}

// request-stream with an explicit REQUEST_N window: request 2, check that no
// more than 2 come, then request 3 and expect the rest and COMPLETE.
function requestStream(socket) {
  return new Promise((resolve, reject) => {
    const got = [];
    const windows = c.STREAM_WINDOWS.slice();
    let requested = 0;
    let subscription;
    const requestNext = () => {
      const n = windows.shift();
      requested += n;
      subscription.request(n);
    };
    socket
      .requestStream(payload(String(c.STREAM_COUNT), 'count'))
      .subscribe({
        onSubscribe(s) {
          subscription = s;
          requestNext();
        },
        onNext(p) {
          got.push(c.text(p.data));
          if (got.length > requested) {
            reject(new Error(`got ${got.length} items with only ${requested} requested`));
          } else if (got.length === requested && windows.length > 0) {
            const seen = got.length;
            setTimeout(() => {
              if (got.length !== seen) {
                reject(new Error(`got ${got.length} items with only ${requested} requested`));
              } else {
                requestNext();
              }
            }, c.QUIET_MS);
          }
        },
        onComplete() {
          if (windows.length > 0) {
            reject(new Error(`completed after ${got.length} items, before the last window`));
          }
          resolve(got);
        },
        onError: reject,
      });
  });
}

function requestChannel(socket) {
  return new Promise((resolve, reject) => {
    const got = [];
    const out = [payload('start', 'chat'), ...c.CHANNEL_OUT.map(d => payload(d))];
    socket.requestChannel(Flowable.just(...out)).subscribe({
      onSubscribe(s) {
        s.request(10);
      },
      onNext(p) {
        got.push(c.text(p.data));
      },
      onComplete() {
        resolve(got);
      },
      onError: reject,
    });
  });
}

let step = 'connect';

async function main() {
  const {url, ca} = c.parseArgs('requester-0.0.27.js', process.argv.slice(2));
  c.deadline(() => step);

  const client = new RSocketClient({
    setup: {
      keepAlive: c.KEEPALIVE_MS,
      lifetime: c.LIFETIME_MS,
      dataMimeType: c.DATA_MIME,
      metadataMimeType: c.METADATA_MIME,
    },
    transport: new RSocketWebSocketClient(
      {url, wsCreator: u => new WebSocket(u, {ca})},
      BufferEncoders,
    ),
    errorHandler: e => c.fail(`${step}: connection error: ${c.describe(e)}`),
  });
  const socket = await single(client.connect());

  step = 'request-response';
  const answer = await single(socket.requestResponse(payload('hi', 'echo')));
  c.expectEqual(step, c.text(answer.data), 'echo:hi');
  c.ok(step);

  step = 'fire-and-forget';
  socket.fireAndForget(payload(NOTE, 'log'));
  c.ok(step);

  step = 'request-stream';
  const items = await requestStream(socket);
  c.expectEqual(step, items, [...Array(c.STREAM_COUNT).keys()].map(String));
  c.ok(step);

  step = 'request-channel';
  const chat = await requestChannel(socket);
  c.expectEqual(step, chat, ['start', ...c.CHANNEL_OUT].map(d => 'chat:' + d));
  c.ok(step);

  client.close();
  process.exit(0);
}

main().catch(e => c.fail(`${step}: ${c.describe(e)}`));
