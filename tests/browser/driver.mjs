// A headless Chromium that a Python test drives line by line (tests/browser_support.py).
//
// Debian's /usr/bin/chromium, launched by playwright-core (which never downloads a browser).
// Reads one JSON command per line on stdin, {"id": n, "op": "...", ...}, and answers each with
// one JSON line on stdout, {"id": n, "ok": true, "value": ...} or {"id": n, "ok": false,
// "error": "..."}. Console errors and failed requests of the page are kept and returned by the
// "log" op. Exits when stdin closes.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const profile = mkdtempSync(join(tmpdir(), "tb-chromium-"));

// A fresh profile (Playwright passes it as --user-data-dir), removed on exit.
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1100, height: 900 },
  // No network but loopback here: without these Chromium keeps dialing Google's hosts.
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const page = context.pages()[0] ?? (await context.newPage());
const log = [];
page.on("console", (message) => {
  if (message.type() === "error" || message.type() === "warning") {
    log.push(`${message.type()}: ${message.text()}`);
  }
});
page.on("pageerror", (error) => log.push(`pageerror: ${error.message}`));

// Stripe's hosted pages (Checkout, Connect onboarding and the Express dashboard) are not
// reachable here: a navigation to one lands on a stand-in.
const stripeVisits = [];
for (const [pattern, title] of [
  ["https://checkout.stripe.com/**", "Stripe Checkout"],
  ["https://connect.stripe.com/**", "Stripe Connect"],
]) {
  await context.route(pattern, async (route) => {
    stripeVisits.push(route.request().url());
    await route.fulfill({
      status: 200,
      contentType: "text/html",
      body: `<!doctype html><title>${title}</title><h1>${title} (stand-in)</h1>`,
    });
  });
}

async function textOf(selector) {
  return (await page.locator(selector).first().textContent()) ?? "";
}

async function waitForText(selector, pattern, timeoutMs) {
  const started = Date.now();
  const regex = new RegExp(pattern);
  let last = null;
  while (Date.now() - started <= timeoutMs) {
    const locator = page.locator(selector).first();
    if ((await locator.count()) > 0 && (await locator.isVisible())) {
      last = (await locator.textContent()) ?? "";
      if (regex.test(last)) return { text: last, elapsed_ms: Date.now() - started };
    }
    await page.waitForTimeout(25);
  }
  throw new Error(`${selector} did not match /${pattern}/ within ${timeoutMs} ms (last: ${JSON.stringify(last)})`);
}

const ops = {
  goto: async ({ url }) => {
    await page.goto(url, { waitUntil: "domcontentloaded" });
    return page.url();
  },
  reload: async () => {
    await page.reload({ waitUntil: "domcontentloaded" });
    return page.url();
  },
  url: async () => page.url(),
  click: async ({ selector }) => {
    await page.locator(selector).first().click({ timeout: 5000 });
    return true;
  },
  press: async ({ key }) => {
    await page.keyboard.press(key);
    return true;
  },
  text: async ({ selector }) => textOf(selector),
  visible: async ({ selector }) => page.locator(selector).first().isVisible(),
  wait_for_text: async ({ selector, pattern, timeout_ms }) => waitForText(selector, pattern, timeout_ms ?? 5000),
  wait_for_url: async ({ pattern, timeout_ms }) => {
    await page.waitForURL(new RegExp(pattern), { timeout: timeout_ms ?? 5000 });
    return page.url();
  },
  focused: async () =>
    page.evaluate(() => {
      const el = document.activeElement;
      if (!el || el === document.body) return null;
      return {
        tag: el.tagName.toLowerCase(),
        text: (el.textContent ?? "").trim(),
        id: el.id || null,
        product: el.getAttribute("data-product"),
        label: el.getAttribute("aria-label"),
        outline: getComputedStyle(el).outlineStyle,
      };
    }),
  session_storage: async ({ key, value }) =>
    page.evaluate(([k, v]) => {
      if (v === null) sessionStorage.removeItem(k);
      else sessionStorage.setItem(k, v);
      return true;
    }, [key, value]),
  attribute: async ({ selector, name }) => page.locator(selector).first().getAttribute(name),
  fill: async ({ selector, value }) => {
    await page.locator(selector).first().fill(value, { timeout: 5000 });
    return true;
  },
  count: async ({ selector }) => page.locator(selector).count(),
  screenshot: async ({ path }) => {
    await page.screenshot({ path, fullPage: true });
    return path;
  },
  stripe_visits: async () => stripeVisits.slice(),
  log: async () => log.splice(0),
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let id = null;
  try {
    const command = JSON.parse(line);
    id = command.id;
    const op = ops[command.op];
    if (!op) throw new Error(`unknown op ${command.op}`);
    const value = await op(command);
    process.stdout.write(JSON.stringify({ id, ok: true, value }) + "\n");
  } catch (error) {
    process.stdout.write(JSON.stringify({ id, ok: false, error: String(error?.message ?? error) }) + "\n");
  }
}
await context.close();
rmSync(profile, { recursive: true, force: true });
