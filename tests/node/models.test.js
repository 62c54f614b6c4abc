'use strict';
// The dashboard's models page in a real browser (Debian's Chromium, driven
// by playwright-core): each model's card says which backend runs it and
// its state, a model on tract, the slow fallback, carries a warning, and
// the model events list each model's load.
//
// Run by tests/python/test_dashboard.py, which starts a broker serving
// tests/models/tiny-cnn.onnx twice and passes:
//
//   WARREN_HTTP_URL       http://127.0.0.1:PORT
//   WARREN_TRACT_MODEL    the model configured with backend = "tract"
//   WARREN_ORT_MODEL      the model configured with backend = "onnxruntime"
//   CHROMIUM_PATH         the browser (default /usr/bin/chromium)
//   WARREN_ARTIFACTS_DIR  where dashboard-models.png goes
//
// Every wait is on something the page shows, never a fixed sleep.

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { chromium } = require('playwright-core');

const HTTP_URL = process.env.WARREN_HTTP_URL;
const TRACT_MODEL = process.env.WARREN_TRACT_MODEL;
const ORT_MODEL = process.env.WARREN_ORT_MODEL;
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARTIFACTS = process.env.WARREN_ARTIFACTS_DIR || path.resolve(__dirname, '..', '..', 'artifacts');
const UI_TIMEOUT_MS = 20_000;

test('a model on tract is flagged, one on ONNX Runtime shows its version', { timeout: 90_000 }, async () => {
  assert.ok(HTTP_URL && TRACT_MODEL && ORT_MODEL,
    'WARREN_HTTP_URL, WARREN_TRACT_MODEL and WARREN_ORT_MODEL must be set');
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

    await page.goto(HTTP_URL);
    await page.getByLabel('User').fill('guest');
    await page.getByLabel('Password').fill('guest');
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.locator('#tabs').getByRole('link', { name: 'Models' }).click();

    const tract = page.locator(`.card.model[data-model="${TRACT_MODEL}"]`);
    await tract.locator('dd.backend', { hasText: /^tract$/ }).waitFor();
    const warning = tract.locator('.backend-warning');
    await warning.waitFor({ state: 'visible' });
    assert.match(await warning.textContent(), /several times slower than ONNX Runtime/);

    const ort = page.locator(`.card.model[data-model="${ORT_MODEL}"]`);
    await ort.locator('dd.backend', { hasText: /^ONNX Runtime \d+\.\d+\.\d+$/ }).waitFor();
    assert.equal(await ort.locator('.backend-warning').isVisible(), false,
      'no warning on the model ONNX Runtime runs');

    // Both versions' loads are model events, listed under the cards.
    for (const model of [TRACT_MODEL, ORT_MODEL]) {
      const row = page.locator(`tr[data-event="loaded"][data-model="${model}"]`);
      await row.waitFor();
      assert.match(await row.locator('td.details').textContent(), /^queue \S+$/);
    }
    assert.match(await ort.locator('dd.state').textContent(), /^serving$/);

    await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard-models.png'), fullPage: true });
    assert.deepEqual(pageErrors, [], 'uncaught exceptions in the page');
  } finally {
    await browser.close();
  }
});
