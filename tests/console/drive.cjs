// Drives a sidecar's web console in headless Chromium, as a person would: signs in, looks
// at every page, keeps version 2 of the first open conflict, retries one dead letter and
// discards another. Run by tests/console.rs:
//   node drive.cjs <base url> <token> <screenshot folder>
// with NODE_PATH pointing at a node_modules that holds playwright-core. It prints one line
// per step and exits non-zero on the first thing that is not as expected.
const { chromium } = require('playwright-core');
const path = require('path');
const fs = require('fs');

const [base, token, shots] = process.argv.slice(2);

function expect(condition, what) {
  if (!condition) {
    throw new Error(`not as expected: ${what}`);
  }
}

async function shot(page, name) {
  const file = path.join(shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot ${file}`);
}

(async () => {
  fs.mkdirSync(shots, { recursive: true });
  const profile = fs.mkdtempSync(path.join(require('os').tmpdir(), 'weft-chromium-'));
  // A fresh profile each run; the sidecar's certificate is signed by the mesh CA, which
  // this browser does not know.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
  });
  const page = await context.newPage();

  await page.goto(`${base}/console`);
  expect(page.url().endsWith('/console/login'), `an unsigned visit lands on the sign-in page, not ${page.url()}`);
  await page.fill('input[name=token]', 'wrong');
  await page.click('button[type=submit]');
  expect((await page.content()).includes('Wrong token'), 'a wrong token is refused');
  await page.goto(`${base}/console/login`);
  await page.fill('input[name=token]', token);
  await page.fill('input[name=name]', 'ana');
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  expect(page.url().endsWith('/console'), `signed in, the mesh page, not ${page.url()}`);
  const mesh = await page.textContent('main');
  expect(mesh.includes('Sending') && mesh.includes('Applying'), 'the mesh page shows both directions');
  expect((await page.$$('svg[aria-label="lag chart"] polyline')).length > 0, 'the lag chart has a line');
  const matrix = await page.$$('table.mesh tr');
  expect(matrix.length === 4, `the whole mesh: a header and three nodes, saw ${matrix.length} rows`);
  console.log('mesh page ok');
  await shot(page, '1-mesh');

  await page.click('text=Conflicts');
  const tables = await page.$$('table.conflict');
  expect(tables.length === 1, `one open conflict, saw ${tables.length}`);
  expect((await page.$$('table.conflict td.diff')).length > 0, 'differing values are marked');
  await shot(page, '2-conflicts');
  await Promise.all([page.waitForNavigation(), page.click('table.conflict button:has-text("Keep version 2")')]);
  const resolved = await page.textContent('.note');
  expect(resolved.includes('resolved by ana: kept version 2'), `the resolution is confirmed: ${resolved}`);
  console.log(`conflict resolved: ${resolved}`);
  await shot(page, '3-conflict-resolved');

  await page.click('text=Dead letters');
  const rows = await page.$$('tr[data-letter]');
  expect(rows.length === 2, `two dead letters, saw ${rows.length}`);
  await shot(page, '4-dead-letters');
  await Promise.all([page.waitForNavigation(), page.click('tr[data-letter] >> nth=0 >> button:has-text("Retry")')]);
  const retried = await page.textContent('.note');
  expect(retried.includes('due now'), `the retry is confirmed: ${retried}`);
  await Promise.all([page.waitForNavigation(), page.click('tr[data-letter] >> nth=1 >> button:has-text("Discard")')]);
  const discarded = await page.textContent('.note');
  expect(discarded.includes('discarded by ana'), `the discard is confirmed: ${discarded}`);
  console.log(`dead letters: ${retried} / ${discarded}`);
  await shot(page, '5-dead-letters-after');

  await page.click('text=Resolutions');
  const history = await page.textContent('main');
  expect(history.includes('ana') && history.includes('took sibling 2'), 'the resolution is in the history');
  await shot(page, '6-resolutions');

  await context.close();
  console.log('OK');
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
