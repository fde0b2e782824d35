'use strict';
// What both rsocket-js requesters share: the routes and answers (the same as
// ../rsocket_py/requester.py uses), argument parsing, OK/FAIL lines and the
// deadline.

const fs = require('fs');

const SERVICE = 'com.example.Echo';

// SETUP as rsocket-py's requester sends it: composite metadata, octet-stream
// data, no SETUP payload (a requester registers nothing).
const METADATA_MIME = 'message/x.rsocket.composite-metadata.v0';
const DATA_MIME = 'application/octet-stream';
const KEEPALIVE_MS = 1000;
const LIFETIME_MS = 600000;

// The whole run, connect included, must end within this.
const DEADLINE_MS = 15000;
// How long a stream must stay quiet once its window is used up.
const QUIET_MS = 300;

const STREAM_COUNT = 5;
const STREAM_WINDOWS = [2, 3];
const CHANNEL_OUT = ['c0', 'c1', 'c2'];

function usage(script) {
  return (
    `usage: node ${script} URL [--ca FILE]\n` +
    '  URL: ws://HOST:PORT/PATH or wss://HOST:PORT/PATH\n' +
    '  --ca FILE: PEM CA certificate to trust for wss://'
  );
}

function parseArgs(script, argv) {
  let url;
  let ca;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--ca') {
      ca = argv[++i];
      if (!ca) {
        badUsage(script, '--ca needs a FILE');
      }
    } else if (a === '-h' || a === '--help') {
      console.error(usage(script));
      process.exit(0);
    } else if (!url && !a.startsWith('-')) {
      url = a;
    } else {
      badUsage(script, `unexpected argument ${a}`);
    }
  }
  if (!url || !/^wss?:\/\//.test(url)) {
    badUsage(script, 'need a ws:// or wss:// URL');
  }
  return {url, ca: ca ? fs.readFileSync(ca) : undefined};
}

function badUsage(script, why) {
  console.error(`${script}: ${why}\n${usage(script)}`);
  process.exit(2);
}

function ok(name) {
  console.log('OK ' + name);
}

function fail(message) {
  console.log('FAIL ' + message);
  process.exit(1);
}

// Fails the run if it is not over in DEADLINE_MS; step() names what it was
// waiting for.
function deadline(step) {
  setTimeout(() => {
    fail(`timeout: ${step()} not done after ${DEADLINE_MS / 1000}s`);
  }, DEADLINE_MS);
}

function expectEqual(name, got, want) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) {
    fail(`${name}: got ${g}, want ${w}`);
  }
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// An Error, an rsocket ERROR frame's error or a WebSocket error event, as text.
function describe(e) {
  if (e == null) {
    return 'unknown error';
  }
  if (e.error && e.error !== e) {
    return describe(e.error);
  }
  const code = e.code !== undefined ? ` (code ${e.code})` : '';
  const message = e.message || String(e);
  return message + code;
}

function text(buffer) {
  return buffer == null ? null : Buffer.from(buffer).toString('utf8');
}

module.exports = {
  SERVICE,
  METADATA_MIME,
  DATA_MIME,
  KEEPALIVE_MS,
  LIFETIME_MS,
  DEADLINE_MS,
  QUIET_MS,
  STREAM_COUNT,
  STREAM_WINDOWS,
  CHANNEL_OUT,
  parseArgs,
  ok,
  fail,
  deadline,
  expectEqual,
  sleep,
  describe,
  text,
};
