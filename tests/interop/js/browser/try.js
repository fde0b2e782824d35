// The browser page's entry module (bundled by `npm run build:browser` into
// dist/try.js): rsocket-js 1.0 (alpha) in the browser, over the browser's own
// WebSocket, to the broker named by ?broker=ws://HOST:PORT/PATH.
//
// It SETUPs like ../../rsocket_py/requester.py (composite metadata,
// octet-stream data, no SETUP payload), then
//   - request-response to com.example.Echo.echo with "browser",
//     expecting "echo:browser";
//   - request-stream to com.example.Echo.count with "5", asking for 2 items
//     (REQUEST_STREAM's initial n), checking no third comes, then REQUEST_N 3,
//     expecting "0".."4" and COMPLETE;
// and writes one line per check into <pre id="result">:
//   OK request-response echo:browser
//   OK request-stream 5 items windows 2+3
// or `FAIL <check>: <why>`; the windows table shows what each window brought.
// When nothing more will come, #result gets data-done="true".

import {RSocketConnector} from 'rsocket-core';
import {WebsocketClientTransport} from 'rsocket-websocket-client';
import {
  WellKnownMimeType,
  encodeCompositeMetadata,
  encodeRoute,
} from 'rsocket-composite-metadata';

const SERVICE = 'com.example.Echo';
const DEADLINE_MS = 10000;
const QUIET_MS = 300;
const STREAM_COUNT = 5;
const STREAM_WINDOWS = [2, 3];

const resultEl = document.getElementById('result');
const windowsEl = document.getElementById('windows');
let finished = false;
let step = 'start';

function line(text) {
  if (!finished) {
    resultEl.textContent += text + '\n';
  }
}

function finish() {
  if (!finished) {
    finished = true;
    resultEl.dataset.done = 'true';
  }
}

function describe(e) {
  // A browser's WebSocket error event says nothing; its console says why.
  if (e == null) return 'no detail given (see the browser console)';
  if (e.error && e.error !== e) return describe(e.error);
  if (e instanceof Event) return `${e.type} event on the WebSocket`;
  return e.message || String(e);
}

function route(method) {
  return encodeCompositeMetadata([
    [WellKnownMimeType.MESSAGE_RSOCKET_ROUTING, encodeRoute(SERVICE + '.' + method)],
  ]);
}

function payload(data, method) {
  return {data: Buffer.from(data), metadata: route(method)};
}

const text = b => (b == null ? null : Buffer.from(b).toString('utf8'));

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

// One table row per window: its REQUEST_N and the items it brought.
function windowRow(index, n) {
  const row = document.createElement('tr');
  const items = document.createElement('td');
  for (const v of [`#${index + 1}`, `${n}`]) {
    const td = document.createElement('td');
    td.textContent = v;
    row.appendChild(td);
  }
  row.appendChild(items);
  windowsEl.appendChild(row);
  return {
    add(item) {
      items.textContent = items.textContent ? items.textContent + ', ' + item : item;
    },
  };
}

function requestStream(rsocket) {
  return new Promise((resolve, reject) => {
    const got = [];
    const perWindow = [];
    const windows = STREAM_WINDOWS.slice();
    let requested = 0;
    let row;
    let stream;
    let done = false;
    const open = () => {
      const n = windows.shift();
      requested += n;
      perWindow.push(0);
      row = windowRow(perWindow.length - 1, n);
      return n;
    };
    const end = () => {
      if (done) return;
      done = true;
      if (windows.length > 0) {
        reject(new Error(`completed after ${got.length} items, before the last window`));
      }
      resolve({got, perWindow});
    };
    const first = open();
    stream = rsocket.requestStream(payload(String(STREAM_COUNT), 'count'), first, {
      onNext(p, isComplete) {
        const item = text(p.data);
        got.push(item);
        perWindow[perWindow.length - 1]++;
        row.add(item);
        if (got.length > requested) {
          reject(new Error(`got ${got.length} items with only ${requested} requested`));
        } else if (isComplete) {
          end();
        } else if (got.length === requested && windows.length > 0) {
          const seen = got.length;
          setTimeout(() => {
            if (got.length !== seen) {
              reject(new Error(`got ${got.length} items with only ${requested} requested`));
            } else {
              stream.request(open());
            }
          }, QUIET_MS);
        }
      },
      onComplete: end,
      onError: reject,
      onExtension() {},
    });
  });
}

async function main() {
  const broker = new URLSearchParams(location.search).get('broker');
  if (!broker) {
    line('FAIL no broker: open this page with ?broker=ws://HOST:PORT/rsocket');
    finish();
    return;
  }
  document.getElementById('broker').textContent = broker;
  setTimeout(() => {
    line(`FAIL timeout: ${step} not done after ${DEADLINE_MS / 1000}s`);
    finish();
  }, DEADLINE_MS);

  step = 'connect';
  let rsocket;
  try {
    rsocket = await new RSocketConnector({
      setup: {
        keepAlive: 1000,
        lifetime: 600000,
        dataMimeType: 'application/octet-stream',
        metadataMimeType: 'message/x.rsocket.composite-metadata.v0',
      },
      transport: new WebsocketClientTransport({url: broker}),
    }).connect();
  } catch (e) {
    line(`FAIL connect ${broker}: ${describe(e)}`);
    finish();
    return;
  }
  rsocket.onClose(e => {
    if (step !== 'close') {
      line(`FAIL ${step}: connection closed${e ? ': ' + describe(e) : ''}`);
      finish();
    }
  });

  step = 'request-response';
  try {
    const answer = await requestResponse(rsocket, payload('browser', 'echo'));
    const got = text(answer && answer.data);
    line(got === 'echo:browser' ? `OK request-response ${got}` : `FAIL request-response: got ${JSON.stringify(got)}, want "echo:browser"`);
  } catch (e) {
    line(`FAIL request-response: ${describe(e)}`);
  }

  step = 'request-stream';
  try {
    const {got, perWindow} = await requestStream(rsocket);
    const want = [...Array(STREAM_COUNT).keys()].map(String);
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      line(`FAIL request-stream: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
    } else if (JSON.stringify(perWindow) !== JSON.stringify(STREAM_WINDOWS)) {
      line(`FAIL request-stream: windows brought ${perWindow.join('+')}, want ${STREAM_WINDOWS.join('+')}`);
    } else {
      line(`OK request-stream ${got.length} items windows ${perWindow.join('+')}`);
    }
  } catch (e) {
    line(`FAIL request-stream: ${describe(e)}`);
  }

  step = 'close';
  rsocket.close();
  finish();
}

main().catch(e => {
  line(`FAIL ${step}: ${describe(e)}`);
  finish();
});
