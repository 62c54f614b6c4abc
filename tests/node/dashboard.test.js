'use strict';
// The web dashboard in a real browser: Debian's Chromium, driven by
// playwright-core (which downloads no browser of its own).
//
// Run by tests/python/test_dashboard.py, which starts a broker and passes:
//
//   WARREN_HTTP_URL       http://127.0.0.1:PORT (the dashboard and /api)
//   WARREN_AMQP_URL       amqp://guest:guest@127.0.0.1:PORT/%2f
//   CHROMIUM_PATH         the browser (default /usr/bin/chromium)
//   WARREN_ARTIFACTS_DIR  where the screenshots go (default <repo>/artifacts):
//                         dashboard-queues.png, dashboard-overview.png, and
//                         dashboard-failure.png when the test fails
//
//   node --test tests/node/dashboard.test.js
//
// Every wait is on something the page shows (Playwright's auto-waiting
// locators), never a fixed sleep: the dashboard polls the API every 2 s.

const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const amqp = require('amqplib');
const { chromium } = require('playwright-core');

const HTTP_URL = process.env.WARREN_HTTP_URL;
const AMQP_URL = process.env.WARREN_AMQP_URL;
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARTIFACTS = process.env.WARREN_ARTIFACTS_DIR || path.resolve(__dirname, '..', '..', 'artifacts');
const MESSAGES = 7;
// Long enough for a few polls of the page (every 2 s) on a slow machine.
const UI_TIMEOUT_MS = 20_000;

// Rejects if `promise` has not settled within `ms`, naming what was awaited.
function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function checkEnvironment() {
  assert.ok(HTTP_URL, 'WARREN_HTTP_URL must be set to the broker\'s HTTP address (http://HOST:PORT)');
  assert.ok(AMQP_URL, 'WARREN_AMQP_URL must be set to the broker URL');
  try {
    fs.accessSync(CHROMIUM, fs.constants.X_OK);
  } catch {
    assert.fail(`Chromium not found at ${CHROMIUM}: install it (on Debian: apt-get install -y chromium; `
      + 'scripts/test.sh does this) or set CHROMIUM_PATH');
  }
  fs.mkdirSync(ARTIFACTS, { recursive: true });
}

// Declares a queue of our own and publishes MESSAGES confirmed messages.
async function fillQueue(conn, queue) {
  const ch = await conn.createConfirmChannel();
  // Not exclusive: the broker's HTTP side reads it from its own connection.
  await ch.assertQueue(queue, { durable: false });
  for (let i = 0; i < MESSAGES; i++) {
    ch.sendToQueue(queue, Buffer.from(payloadFor(queue, i)), { deliveryMode: 1 });
  }
  await within(15_000, 'publisher confirms', ch.waitForConfirms());
  const { messageCount } = await ch.checkQueue(queue);
  assert.equal(messageCount, MESSAGES, 'messages in the queue after the confirmed publishes');
  await ch.close();
}

function payloadFor(queue, i) {
  return `dashboard message ${i} for ${queue}`;
}

async function screenshot(page, file) {
  await page.screenshot({ path: path.join(ARTIFACTS, file), fullPage: true });
}

test('the dashboard shows a queue, gets a message and draws the overview charts', { timeout: 120_000 }, async () => {
  checkEnvironment();
  const queue = `dashboard-${crypto.randomBytes(6).toString('hex')}`;
  const conn = await within(15_000, 'AMQP connection', amqp.connect(AMQP_URL));
  const connErrors = [];
  conn.on('error', (err) => connErrors.push(err.message));
  let browser;
  let page;
  try {
    await fillQueue(conn, queue);

    // CI runs as root, where Chromium's sandbox cannot start; /dev/shm is
    // often tiny in containers.
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-dev-shm-usage'],
    });
    page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(UI_TIMEOUT_MS);
    // Uncaught exceptions in the page fail the test. (Console errors do
    // not: the browser logs the 401 of the wrong password below as one.)
    const pageErrors = [];
    page.on('pageerror', (err) => pageErrors.push(err.message));

    // ------------------------------------------------------------ login
    await page.goto(HTTP_URL);
    const user = page.getByLabel('User');
    const password = page.getByLabel('Password');
    await user.fill('guest');
    await password.fill('not the password');
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.locator('#login-message', { hasText: 'Login failed' }).waitFor();

    await user.fill('guest');
    await password.fill('guest');
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.locator('#tabs').waitFor({ state: 'visible' });
    await page.locator('#product-version', { hasText: /^v\S+/ }).waitFor();

    // ----------------------------------------------------------- queues
    await page.locator('#tabs').getByRole('link', { name: 'Queues' }).click();
    // data-queue is "<vhost>/<name>"; the vhost is "/".
    const row = page.locator(`tr[data-queue="//${queue}"]`);
    await row.locator('td.messages-ready', { hasText: new RegExp(`^${MESSAGES}$`) }).waitFor();
    assert.equal(await row.locator('td.vhost').textContent(), '/');
    assert.equal(await row.locator('td.messages').textContent(), String(MESSAGES));
    const link = row.getByRole('link', { name: queue, exact: true });
    assert.equal(await link.getAttribute('href'), `#/queues/%2F/${queue}`);
    await screenshot(page, 'dashboard-queues.png');

    // ----------------------------------------------------- queue detail
    await link.click();
    await page.locator('h2 .queue-name', { hasText: queue }).waitFor();
    const ready = page.locator('dl.stats dd.messages-ready');
    await ready.filter({ hasText: new RegExp(`^${MESSAGES}$`) }).waitFor();
    // The implicit binding from the default exchange.
    await page.locator('td.source', { hasText: '(default exchange)' }).waitFor();

    const getForm = page.locator('#get-form');
    await getForm.getByLabel('Ack mode').selectOption('reject_requeue_true');
    await getForm.getByLabel('Messages').fill('1');
    await getForm.getByRole('button', { name: 'Get messages' }).click();
    await page.locator('#get-results pre.payload', { hasText: payloadFor(queue, 0) }).waitFor();
    assert.equal(await page.locator('#get-results .message').count(), 1, 'messages shown by the get form');
    // reject_requeue_true put it back: the depth the page shows is MESSAGES again.
    await ready.filter({ hasText: new RegExp(`^${MESSAGES}$`) }).waitFor();

    // --------------------------------------------------------- overview
    await page.locator('#tabs').getByRole('link', { name: 'Overview' }).click();
    await page.locator('#chart-rates canvas').first().waitFor({ state: 'visible' });
    await page.locator('#chart-queued canvas').first().waitFor({ state: 'visible' });
    // Totals come from /api/overview: at least our queue and connection.
    await page.locator('#total-queues', { hasText: /^[1-9]\d*$/ }).waitFor();
    await page.locator('#total-connections', { hasText: /^[1-9]\d*$/ }).waitFor();
    await screenshot(page, 'dashboard-overview.png');

    assert.deepEqual(pageErrors, [], 'uncaught exceptions in the page');
    assert.deepEqual(connErrors, [], 'AMQP connection errors');

    // Still all there over AMQP: the get requeued its message.
    const ch = await conn.createChannel();
    const { messageCount } = await ch.checkQueue(queue);
    assert.equal(messageCount, MESSAGES);
    await ch.deleteQueue(queue);
    await ch.close();
  } catch (err) {
    // What the page showed when it went wrong, for the CI artifacts.
    if (page) await screenshot(page, 'dashboard-failure.png').catch(() => {});
    throw err;
  } finally {
    // After a failure too: an open browser or socket keeps node running.
    if (browser) await within(10_000, 'browser close', browser.close()).catch(() => {});
    await within(5_000, 'connection close', conn.close()).catch(() => {});
  }
});
