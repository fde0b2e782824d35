'use strict';
// Runs browser/try.html in headless Chromium against a broker and reports
// what the page wrote: serves browser/ on a loopback port, opens
// try.html?broker=BROKER_URL, waits (at most 20 s) for the page to say it is
// done, prints the page's result lines (`OK ...` / `FAIL ...`) to stdout and
// exits 0 only if there is at least one line and every line starts with OK.
// The page's console goes to stderr.
//
// usage: node run-browser.js BROKER_URL [--insecure]
//   BROKER_URL  ws://HOST:PORT/PATH (or wss://)
//   --insecure  accept any TLS certificate (for wss:// with a test CA)
// Needs `npm run build:browser` first. Chromium: $CHROMIUM, or /usr/bin/chromium.

const fs = require('fs');
const http = require('http');
const path = require('path');
const puppeteer = require('puppeteer-core');

const DEADLINE_MS = 20000;
const ROOT = path.join(__dirname, 'browser');
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.map': 'application/json',
};

let browser;

function fail(message) {
  console.log('FAIL ' + message);
  kill(browser);
  process.exit(1);
}

function parseArgs(argv) {
  let url;
  let insecure = false;
  for (const a of argv) {
    if (a === '--insecure') insecure = true;
    else if (!url && /^wss?:\/\//.test(a)) url = a;
    else {
      console.error(`run-browser.js: unexpected argument ${a}`);
      url = undefined;
      break;
    }
  }
  if (!url) {
    console.error('usage: node run-browser.js ws://HOST:PORT/PATH [--insecure]');
    process.exit(2);
  }
  return {url, insecure};
}

// Serves browser/ (try.html, dist/) on 127.0.0.1, nothing outside it.
function serve() {
  const server = http.createServer((req, res) => {
    const pathname = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    const file = path.join(ROOT, path.normalize(pathname));
    if (!file.startsWith(ROOT + path.sep)) {
      res.writeHead(403).end();
      return;
    }
    fs.readFile(file, (err, body) => {
      if (err) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, {
        'content-type': TYPES[path.extname(file)] || 'application/octet-stream',
        'cache-control': 'no-store',
      });
      res.end(body);
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

async function main() {
  const {url, insecure} = parseArgs(process.argv.slice(2));
  if (!fs.existsSync(path.join(ROOT, 'dist', 'try.js'))) {
    fail('browser/dist/try.js is missing: run `npm run build:browser` first');
  }

  let stage = 'start';
  const timer = setTimeout(() => {
    fail(`timeout: ${stage} not done after ${DEADLINE_MS / 1000}s`);
  }, DEADLINE_MS);

  const server = await serve();
  const page_url =
    `http://127.0.0.1:${server.address().port}/try.html?broker=` + encodeURIComponent(url);

  stage = 'launching Chromium';
  browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true, // puppeteer passes --headless=new
    args: ['--no-sandbox'],
    acceptInsecureCerts: insecure,
    timeout: 15000,
  });
  const page = await browser.newPage();
  page.on('console', m => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on('pageerror', e => console.error(`[page error] ${e.message}`));
  page.on('requestfailed', r => console.error(`[page] ${r.url()} failed: ${r.failure() && r.failure().errorText}`));

  stage = 'loading the page';
  await page.goto(page_url, {waitUntil: 'load'});
  stage = 'the page';
  await page.waitForSelector('#result[data-done]', {timeout: DEADLINE_MS});
  const text = await page.$eval('#result', el => el.textContent);
  clearTimeout(timer);

  const lines = text.split('\n').filter(l => l.trim() !== '');
  for (const l of lines) {
    console.log(l);
  }
  await close(browser);
  server.close();
  const good = lines.length > 0 && lines.every(l => l.startsWith('OK '));
  if (lines.length === 0) {
    console.log('FAIL the page wrote no result');
  }
  process.exit(good ? 0 : 1);
}

function kill(browser) {
  const child = browser && browser.process();
  if (child && child.exitCode === null) {
    child.kill('SIGKILL');
  }
}

async function close(browser) {
  // browser.close() normally takes a moment; never wait long for it.
  await Promise.race([browser.close(), new Promise(r => setTimeout(r, 3000))]).catch(() => {});
  kill(browser);
}

main().catch(e => fail(`run-browser: ${e && e.message}`));
