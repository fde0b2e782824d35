'use strict';
// An rsocket-js 1.0.0-alpha requester: connects over WebSocket, SETUPs like
// ../rsocket_py/requester.py and calls com.example.Echo in all four
// interaction models, printing one `OK <model>` line per check. Any failure,
// or not being done within 15 s, prints `FAIL ...` and exits 1.
//
// usage: node requester-1.0.js ws://HOST:PORT/PATH [--ca FILE]

const WebSocket = require('ws');
const {RSocketConnector} = require('rsocket-core');
const {WebsocketClientTransport} = require('rsocket-websocket-client');
const {
  WellKnownMimeType,
  encodeCompositeMetadata,
  encodeRoute,
} = require('rsocket-composite-metadata');
const c = require('./common');

const NOTE = 'note-js-1.0';

function route(method) {
  return encodeCompositeMetadata([
    [WellKnownMimeType.MESSAGE_RSOCKET_ROUTING, encodeRoute(c.SERVICE + '.' + method)],
  ]);
}

function payload(data, method) {
  const p = {data: Buffer.from(data)};
  if (method) {
    p.metadata = route(method);
  }
  return p;
}

function requestResponse(rsocket, p) {
  return new Promise((resolve, reject) => {
    rsocket.requestResponse(p, {
      onNext: answer => resolve(answer),
      onComplete: () => resolve(null),
      onError: reject,
      onExtension() {},
    });
  });
}

function fireAndForget(rsocket, p) {
  return new Promise((resolve, reject) => {
    rsocket.fireAndForget(p, {onComplete: resolve, onError: reject});
  });
}

// request-stream with an explicit REQUEST_N window: request 2, check that no
// more than 2 come, then request 3 and expect the rest and COMPLETE.
function requestStream(rsocket) {
  return new Promise((resolve, reject) => {
    const got = [];
    const windows = c.STREAM_WINDOWS.slice();
    let requested = windows.shift();
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      if (windows.length > 0) {
        reject(new Error(`completed after ${got.length} items, before the last window`));
      }
      resolve(got);
    };
    const stream = rsocket.requestStream(payload(String(c.STREAM_COUNT), 'count'), requested, {
      onNext(p, isComplete) {
        got.push(c.text(p.data));
        if (got.length > requested) {
          reject(new Error(`got ${got.length} items with only ${requested} requested`));
        } else if (isComplete) {
          finish();
        } else if (got.length === requested && windows.length > 0) {
          const seen = got.length;
          setTimeout(() => {
            if (got.length !== seen) {
              reject(new Error(`got ${got.length} items with only ${requested} requested`));
            } else {
              const n = windows.shift();
              requested += n;
              stream.request(n);
            }
          }, c.QUIET_MS);
        }
      },
      onComplete: finish,
      onError: reject,
      onExtension() {},
    });
  });
}

function requestChannel(rsocket) {
  return new Promise((resolve, reject) => {
    const got = [];
    const outgoing = c.CHANNEL_OUT.slice();
    let demand = 0;
    let channel;
    // Send our items as the responder asks for them (its REQUEST_N).
    const pump = () => {
      while (channel && demand > 0 && outgoing.length > 0) {
        demand--;
        const data = outgoing.shift();
        channel.onNext(payload(data), outgoing.length === 0);
      }
    };
    channel = rsocket.requestChannel(payload('start', 'chat'), 10, false, {
      onNext(p, isComplete) {
        got.push(c.text(p.data));
        if (isComplete) resolve(got);
      },
      onComplete: () => resolve(got),
      onError: reject,
      onExtension() {},
      request(n) {
        demand += n;
        queueMicrotask(pump);
      },
      cancel() {
        outgoing.length = 0;
      },
    });
    pump();
  });
}

let step = 'connect';

async function main() {
  const {url, ca} = c.parseArgs('requester-1.0.js', process.argv.slice(2));
  c.deadline(() => step);

  const connector = new RSocketConnector({
    setup: {
      keepAlive: c.KEEPALIVE_MS,
      lifetime: c.LIFETIME_MS,
      dataMimeType: c.DATA_MIME,
      metadataMimeType: c.METADATA_MIME,
    },
    transport: new WebsocketClientTransport({
      url,
      wsCreator: u => new WebSocket(u, {ca}),
    }),
  });
  const rsocket = await connector.connect();
  rsocket.onClose(e => {
    if (step !== 'close') {
      c.fail(`${step}: connection closed${e ? ': ' + c.describe(e) : ''}`);
    }
  });

  step = 'request-response';
  const answer = await requestResponse(rsocket, payload('hi', 'echo'));
  c.expectEqual(step, c.text(answer && answer.data), 'echo:hi');
  c.ok(step);

  step = 'fire-and-forget';
  await fireAndForget(rsocket, payload(NOTE, 'log'));
  c.ok(step);

  step = 'request-stream';
  const items = await requestStream(rsocket);
  c.expectEqual(step, items, [...Array(c.STREAM_COUNT).keys()].map(String));
  c.ok(step);

  step = 'request-channel';
  const chat = await requestChannel(rsocket);
  c.expectEqual(step, chat, ['start', ...c.CHANNEL_OUT].map(d => 'chat:' + d));
  c.ok(step);

  step = 'close';
  rsocket.close();
  process.exit(0);
}

main().catch(e => c.fail(`${step}: ${c.describe(e)}`));
