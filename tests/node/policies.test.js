'use strict';
// The dashboard's policies page in a real browser (Debian's Chromium,
// driven by playwright-core): a policy set through the form is listed,
// applies to a queue (whose page names it and shows its effective
// definition), and is deleted with its button.
//
// Run by tests/python/test_dashboard.py, which starts a broker and passes:
//
//   WARREN_HTTP_URL       http://127.0.0.1:PORT
//   CHROMIUM_PATH         the browser (default /usr/bin/chromium)
//   WARREN_ARTIFACTS_DIR  where dashboard-policies.png goes
//
// Every wait is on something the page shows, never a fixed sleep.

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { chromium } = require('playwright-core');

const HTTP_URL = process.env.WARREN_HTTP_URL;
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARTIFACTS = process.env.WARREN_ARTIFACTS_DIR || path.resolve(__dirname, '..', '..', 'artifacts');
const UI_TIMEOUT_MS = 20_000;
const AUTH = `Basic ${Buffer.from('guest:guest').toString('base64')}`;

async function api(method, apiPath, body) {
  const res = await fetch(`${HTTP_URL}/api${apiPath}`, {
    method,
    headers: { Authorization: AUTH, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) assert.fail(`${method} ${apiPath}: ${res.status} ${await res.text()}`);
  return res;
}

test('a policy set on the policies page applies to a queue and is deleted there', { timeout: 90_000 }, async () => {
  assert.ok(HTTP_URL, 'WARREN_HTTP_URL must be set');
  const queue = `ui-policy-queue-${process.pid}`;
  const policy = `ui-policy-${process.pid}`;
  await api('PUT', `/queues/%2F/${queue}`, { durable: false });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(UI_TIMEOUT_MS);
    const pageErrors = [];
    page.on('pageerror', (err) => pageErrors.push(err.message));
    page.on('dialog', (dialog) => dialog.accept());

    await page.goto(HTTP_URL);
    await page.getByLabel('User').fill('guest');
    await page.getByLabel('Password').fill('guest');
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.locator('#tabs').getByRole('link', { name: 'Policies' }).click();

    await page.locator('#policy-name').fill(policy);
    await page.locator('#policy-pattern').fill(`^${queue}$`);
    await page.locator('#policy-apply-to').selectOption('queues');
    await page.locator('#policy-priority').fill('4');
    await page.locator('#policy-definition').fill('{"max-length": 7, "message-ttl": 60000}');
    await page.getByRole('button', { name: 'Set policy' }).click();
    await page.locator('#policy-form .form-status', { hasText: `Policy ${policy} created.` }).waitFor();

    const row = page.locator(`#policies-table tr[data-vhost="/"][data-policy="${policy}"]`);
    await row.waitFor();
    assert.equal(await row.locator('td.apply-to').textContent(), 'queues');
    assert.equal(await row.locator('td.priority').textContent(), '4');
    assert.deepEqual(JSON.parse(await row.locator('td.definition').textContent()),
      { 'max-length': 7, 'message-ttl': 60000 });

    // The queue's page names the policy and what it sets.
    await page.goto(`${HTTP_URL}/#/queues/%2F/${queue}`);
    await page.locator('dd.policy', { hasText: policy }).waitFor();
    assert.deepEqual(JSON.parse(await page.locator('dd.effective-policy').textContent()),
      { 'max-length': 7, 'message-ttl': 60000 });
    await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard-policies.png'), fullPage: true });

    await page.locator('#tabs').getByRole('link', { name: 'Policies' }).click();
    await row.getByRole('button', { name: 'Delete' }).click();
    await row.waitFor({ state: 'detached' });
    const left = await (await api('GET', '/policies')).json();
    assert.equal(left.filter((p) => p.name === policy).length, 0, 'the policy is gone');
    assert.deepEqual(pageErrors, [], 'uncaught exceptions in the page');
  } finally {
    await browser.close();
    await api('DELETE', `/queues/%2F/${queue}`);
  }
});
