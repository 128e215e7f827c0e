// The token page: sign-in (demo), balance with the plan's entitlements and a low-balance warning,
// catalog with Checkout (plans monthly or annually), recent activity, live updates, and the
// Creator section (Stripe Connect onboarding, earnings, payouts, listings).
//
// It reads config.json next to the page: where the API is (apiUrl, "" for the same origin) and,
// when Supabase Realtime is available, the project URL and anon key. Without them the balance
// follows the service's Server-Sent Events stream.

import {
  TokenBillingApi,
  type Balance,
  type CreatorEarning,
  type CreatorPayout,
  type CreatorSummary,
  type Entitlements,
  type LedgerEntry,
  type Listing,
  type Product,
  type ProductPrice,
} from "./api";
import { realtimeBalance, streamBalance, type LiveHandlers, type LiveState, type Stop } from "./live";
import {
  disabledInWords,
  isExpired,
  plainWords,
  requirementInWords,
  type Context,
} from "./messages";
import { formatMicro, formatMicroExact, formatMinor, hasFraction } from "./money";

interface Config {
  apiUrl: string;
  supabaseUrl: string | null;
  supabaseAnonKey: string | null;
  devSignIn: boolean;
  stripePublishableKey?: string | null;
}

// The part of Stripe.js (https://js.stripe.com/v3/, which Stripe requires be loaded from its own
// domain) the Payment Element needs.
interface StripeElement {
  mount(selector: string): void;
}
interface StripeElements {
  create(kind: "payment"): StripeElement;
}
interface StripeJs {
  elements(options: { clientSecret: string }): StripeElements;
  confirmPayment(options: {
    elements: StripeElements;
    confirmParams: { return_url: string };
  }): Promise<{ error?: { message?: string } }>;
}
declare global {
  interface Window {
    Stripe?: (publishableKey: string) => StripeJs;
  }
}

interface Session {
  token: string;
  userId: string;
  email: string;
}

const SESSION_KEY = "token-billing.session";
const numbers = new Intl.NumberFormat("en-US");
const times = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const element = document.getElementById(id);
  if (!element) throw new Error(`#${id} is missing from the page`);
  return element as T;
}

function loadSession(): Session | null {
  try {
    const raw = sessionStorage.getItem(SESSION_KEY);
    return raw ? (JSON.parse(raw) as Session) : null;
  } catch {
    return null;
  }
}

function saveSession(value: Session | null): void {
  if (value) sessionStorage.setItem(SESSION_KEY, JSON.stringify(value));
  else sessionStorage.removeItem(SESSION_KEY);
}

let config: Config = {
  apiUrl: "",
  supabaseUrl: null,
  supabaseAnonKey: null,
  devSignIn: false,
  stripePublishableKey: null,
};
let session: Session | null = loadSession();
let stopLive: Stop | null = null;
let shown: Balance | null = null;
let entitlements: Entitlements | null = null;
let catalog: Product[] = [];
// The share of the plan's tokens below which the page warns (the seed's alert threshold).
const LOW_BALANCE_SHARE = 0.2;
let ledgerTimer: ReturnType<typeof setTimeout> | undefined;
let creatorShown: CreatorSummary | null = null;
let client = new TokenBillingApi("", () => session?.token ?? null);

// --- messages ------------------------------------------------------------------------------

function showError(message: string, options: { signIn?: boolean } = {}): void {
  $("error-text").textContent = message;
  $("error-sign-in").hidden = !(options.signIn && config.devSignIn);
  $("error").hidden = false;
}

function clearError(): void {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function showNotice(message: string): void {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = false;
}

function fail(error: unknown, context: Context): void {
  if (isExpired(error)) {
    signedOut(plainWords(error, context));
    return;
  }
  showError(plainWords(error, context));
}

// --- rendering -----------------------------------------------------------------------------

function planName(balance: Balance): string {
  const name = balance.plan.charAt(0).toUpperCase() + balance.plan.slice(1);
  const status = balance.subscription_status;
  return status === "none" || status === "active" ? name : `${name} (${status.replace("_", " ")})`;
}

function renderBalance(balance: Balance): void {
  const previous = shown;
  shown = balance;
  const available = $("available");
  available.textContent = numbers.format(balance.available);
  $("reserved").textContent = numbers.format(balance.reserved);
  $("balance").textContent = numbers.format(balance.balance);
  $("plan").textContent = planName(balance);
  if (previous && previous.available !== balance.available) {
    const delta = balance.available - previous.available;
    $("balance-announcement").textContent =
      `Balance updated: ${numbers.format(balance.available)} tokens available ` +
      `(${delta > 0 ? "+" : "−"}${numbers.format(Math.abs(delta))}).`;
    available.classList.add("changed");
    setTimeout(() => available.classList.remove("changed"), 1200);
  }
  if (previous && previous.balance !== balance.balance) {
    clearTimeout(ledgerTimer);
    ledgerTimer = setTimeout(() => void loadLedger(), 300);
  }
  if (previous && previous.plan !== balance.plan) void loadEntitlements();
  renderLowBalance();
}

/** The warning below 20% of the plan's tokens, with a link to the top-up packs. */
function renderLowBalance(): void {
  const warning = $("low-balance");
  const grant = entitlements?.period_tokens ?? 0;
  if (!shown || grant <= 0 || shown.available >= grant * LOW_BALANCE_SHARE) {
    warning.hidden = true;
    return;
  }
  $("low-balance-text").textContent =
    shown.available <= 0
      ? "You're out of tokens."
      : `Low balance: ${numbers.format(shown.available)} of your plan's ` +
        `${numbers.format(grant)} tokens left (under ${LOW_BALANCE_SHARE * 100}%).`;
  warning.hidden = false;
}

function featureName(key: string): string {
  return key.replaceAll("_", " ").replace(/^./, (c) => c.toUpperCase());
}

function renderEntitlements(value: Entitlements): void {
  entitlements = value;
  const list = $("entitlement-list");
  list.replaceChildren();
  for (const [name, limit] of Object.entries(value.limits)) {
    const item = document.createElement("li");
    item.textContent = `${featureName(name)}: ${limit === null ? "unlimited" : numbers.format(limit)}`;
    list.append(item);
  }
  for (const feature of value.features) {
    const item = document.createElement("li");
    item.textContent = featureName(feature);
    list.append(item);
  }
  if (value.grace_until) {
    const item = document.createElement("li");
    item.textContent = `Payment overdue: these stay until ${times.format(new Date(value.grace_until))}`;
    list.append(item);
  }
  $("entitlements").hidden = list.childElementCount === 0;
  renderLowBalance();
}

async function loadEntitlements(): Promise<void> {
  try {
    renderEntitlements(await client.entitlements());
  } catch (error) {
    fail(error, "load");
  }
}

function renderLive(state: LiveState): void {
  const live = $("live");
  live.dataset["state"] = state;
  $("live-text").textContent =
    state === "live" ? "Live" : state === "connecting" ? "Connecting…" : "Reconnecting…";
}

function interval(): "month" | "year" {
  const checked = document.querySelector<HTMLInputElement>('input[name="interval"]:checked');
  return checked?.value === "year" ? "year" : "month";
}

/** The plan's price at the chosen interval (month when it has no annual price). */
function planPrice(product: Product): ProductPrice | null {
  const wanted = product.prices.find((p) => p.interval === interval());
  return wanted ?? product.prices.find((p) => p.interval === "month") ?? null;
}

function price(product: Product): string {
  const chosen = product.kind === "plan" ? planPrice(product) : null;
  const cents = chosen ? chosen.unit_amount : product.price_cents;
  if (cents == null) return "";
  const money = formatMinor(cents, chosen?.currency ?? product.currency ?? "usd");
  if (product.kind !== "plan") return money;
  return chosen?.interval === "year" ? `${money} a year` : `${money} a month`;
}

function renderProducts(products: Product[]): void {
  catalog = products;
  const list = $("products");
  list.replaceChildren();
  $("billing-interval").hidden = !products.some((p) =>
    p.prices.some((price) => price.interval === "year"),
  );
  const forSale = products.filter((p) => (p.price_cents ?? 0) > 0);
  for (const product of forSale) {
    const item = document.createElement("li");
    item.className = "product";
    const title = document.createElement("h3");
    title.textContent = product.name;
    const tokens = document.createElement("p");
    tokens.textContent =
      product.description ??
      `${numbers.format(product.tokens)} tokens` + (product.kind === "plan" ? " every month" : "");
    const cost = document.createElement("p");
    cost.className = "price";
    cost.textContent = price(product);
    const button = document.createElement("button");
    button.type = "button";
    button.dataset["product"] = product.code;
    button.textContent = product.kind === "plan" ? "Subscribe" : "Buy";
    button.setAttribute("aria-label", `${button.textContent} ${product.name} for ${price(product)}`);
    const chosen = product.kind === "plan" ? planPrice(product) : null;
    if (chosen ? !chosen.purchasable : !product.purchasable) {
      // Still focusable, so a keyboard user can reach it and hear why it does nothing.
      button.setAttribute("aria-disabled", "true");
      button.textContent = "Not on sale yet";
    }
    button.addEventListener("click", () => void buy(product, button));
    item.append(title, tokens, cost, button);
    if (config.stripePublishableKey && product.kind === "pack" && product.purchasable) {
      // The same pack through Stripe's Payment Element, on this page: payment_intent.succeeded
      // credits it.
      const here = document.createElement("button");
      here.type = "button";
      here.className = "secondary";
      here.textContent = "Pay here";
      here.setAttribute("aria-label", `Pay for ${product.name} on this page`);
      here.addEventListener("click", () => void payHere(product, here));
      item.append(here);
    }
    list.append(item);
  }
  const note = $("catalog-note");
  note.hidden = forSale.every((p) => p.purchasable);
  const command = document.createElement("code");
  command.textContent = "token-billing stripe sync-products";
  note.replaceChildren(
    "Some products have no Stripe price yet. With a Stripe test key in .env, run ",
    command,
    " to sell them.",
  );
}

function renderLedger(entries: LedgerEntry[]): void {
  const body = $("ledger");
  body.replaceChildren();
  $("history-empty").hidden = entries.length > 0;
  $("history").hidden = entries.length === 0;
  for (const entry of entries) {
    const row = document.createElement("tr");
    const when = document.createElement("td");
    when.textContent = times.format(new Date(entry.created_at));
    const what = document.createElement("td");
    what.textContent = entry.description || entry.kind.charAt(0).toUpperCase() + entry.kind.slice(1);
    const amount = document.createElement("td");
    amount.className = "num " + (entry.amount >= 0 ? "credit" : "debit");
    amount.textContent = (entry.amount >= 0 ? "+" : "−") + numbers.format(Math.abs(entry.amount));
    const after = document.createElement("td");
    after.className = "num";
    after.textContent = numbers.format(entry.balance_after);
    row.append(when, what, amount, after);
    body.append(row);
  }
}

// --- the Creator section -------------------------------------------------------------------

/** Basis points as a percentage, in integer arithmetic: 2000 is "20%", 1250 "12.5%". */
function percent(bps: number): string {
  const whole = Math.trunc(bps / 100);
  const rest = String(bps % 100).padStart(2, "0").replace(/0+$/, "");
  return rest ? `${whole}.${rest}%` : `${whole}%`;
}

function yesOrNot(value: boolean): string {
  return value ? "Yes" : "Not yet";
}

function creatorState(summary: CreatorSummary): string {
  if (summary.deauthorized_at) {
    return "Your Stripe account is no longer connected to this platform: no sales and no payouts.";
  }
  if (!summary.details_submitted) {
    return "Your Stripe onboarding isn't finished. Continue it to start selling.";
  }
  if (summary.charges_enabled && summary.payouts_enabled) {
    return "Your Stripe account can take payments and be paid out.";
  }
  if (summary.charges_enabled) {
    return "Your Stripe account can take payments; payouts start once Stripe has what it needs.";
  }
  return "Stripe needs more before your account can take payments.";
}

const EARNING_KINDS: Record<string, string> = {
  usage_share: "Your share of tokens spent",
  usage_share_reversed: "Share taken back (the tokens were refunded)",
  sale: "Sale",
  debt: "Owed back",
  payout: "Payout",
  payout_returned: "Payout returned",
};

function earningWhat(entry: CreatorEarning): string {
  const kind = EARNING_KINDS[entry.kind] ?? entry.kind.replaceAll("_", " ");
  const tokens = entry.tokens ? ` (${numbers.format(entry.tokens)} tokens)` : "";
  return entry.product_code ? `${kind} on ${entry.product_code}${tokens}` : `${kind}${tokens}`;
}

function signed(text: string, amount: number): string {
  // formatMicroExact writes "−" for a debit; a credit gets its "+".
  return amount > 0 ? `+${text}` : text;
}

function cell(text: string, className?: string): HTMLTableCellElement {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderEarnings(entries: CreatorEarning[], currency: string): void {
  const body = $("creator-earnings-rows");
  body.replaceChildren();
  $("creator-earnings-empty").hidden = entries.length > 0;
  $("creator-earnings").hidden = entries.length === 0;
  for (const entry of entries) {
    const row = document.createElement("tr");
    row.append(
      cell(times.format(new Date(entry.created_at))),
      cell(earningWhat(entry)),
      cell(
        signed(formatMicroExact(entry.amount_microcents, currency), entry.amount_microcents),
        "num " + (entry.amount_microcents >= 0 ? "credit" : "debit"),
      ),
      cell(formatMicroExact(entry.balance_microcents, currency), "num"),
    );
    body.append(row);
  }
}

const PAYOUT_STATUS: Record<CreatorPayout["status"], string> = {
  pending: "On its way",
  paid: "Paid",
  failed: "Failed: the money is back in your balance",
};

function renderPayouts(payouts: CreatorPayout[]): void {
  const body = $("creator-payout-rows");
  body.replaceChildren();
  $("creator-payouts-empty").hidden = payouts.length > 0;
  $("creator-payout-table").hidden = payouts.length === 0;
  for (const payout of payouts) {
    let status = PAYOUT_STATUS[payout.status] ?? payout.status;
    if (payout.reversed_cents > 0) {
      status += ` (${formatMinor(payout.reversed_cents, payout.currency)} reversed)`;
    }
    const row = document.createElement("tr");
    row.append(
      cell(payout.period),
      cell(status),
      cell(formatMinor(payout.amount_cents, payout.currency), "num"),
    );
    body.append(row);
  }
}

function renderListings(listings: Listing[]): void {
  const list = $("creator-listings");
  list.replaceChildren();
  $("creator-listings-empty").hidden = listings.length > 0;
  list.hidden = listings.length === 0;
  for (const listing of listings) {
    const item = document.createElement("li");
    item.dataset["listing"] = listing.code;
    const name = document.createElement("strong");
    name.textContent = listing.name;
    const prices = [];
    if (listing.price_cents !== null) prices.push(formatMinor(listing.price_cents, listing.currency));
    if (listing.tokens_per_run > 0) prices.push(`${numbers.format(listing.tokens_per_run)} tokens a run`);
    const details = document.createElement("span");
    details.className = "muted";
    details.textContent =
      ` (${listing.code}): ${prices.join(", ") || "no price"}` +
      (listing.purchasable || listing.price_cents === null ? "" : ", not for sale right now");
    item.append(name, details);
    list.append(item);
  }
}

function renderCreator(summary: CreatorSummary | null, listings: Listing[]): void {
  const previous = creatorShown;
  creatorShown = summary;
  $("creator").setAttribute("aria-busy", "false");
  $("creator-join").hidden = summary !== null;
  $("creator-account").hidden = summary === null;
  if (!summary) return;
  const currency = summary.currency;
  $("creator-state").textContent = creatorState(summary);
  const disabled = $("creator-disabled");
  disabled.hidden = !summary.disabled_reason;
  disabled.textContent = summary.disabled_reason ? disabledInWords(summary.disabled_reason) : "";
  $("creator-charges").textContent = yesOrNot(summary.charges_enabled);
  $("creator-payouts-enabled").textContent = yesOrNot(summary.payouts_enabled);
  $("creator-commission").textContent =
    `${percent(summary.commission_bps)} (you keep ${percent(10000 - summary.commission_bps)})`;

  const needs = [...new Set(summary.requirements_due.map(requirementInWords))];
  const list = $("creator-requirement-list");
  list.replaceChildren(
    ...needs.map((need) => {
      const item = document.createElement("li");
      item.textContent = need;
      return item;
    }),
  );
  $("creator-requirements").hidden = needs.length === 0;
  const connected = !summary.deauthorized_at;
  const more = $("creator-continue");
  more.hidden = !connected || (summary.details_submitted && needs.length === 0);
  // The same onboarding link collects what Stripe asks for after onboarding.
  more.textContent = summary.details_submitted ? "Give Stripe what it needs" : "Continue onboarding";
  $("creator-dashboard").hidden = !connected || !summary.details_submitted;

  const balance = $("creator-balance");
  balance.textContent = formatMicro(summary.balance_microcents, currency);
  const exact = $("creator-balance-exact");
  exact.hidden = !hasFraction(summary.balance_microcents);
  exact.textContent =
    `Exactly ${formatMicroExact(summary.balance_microcents, currency)}. ` +
    "Payouts take whole cents; the fraction stays in your balance.";
  if (previous && previous.balance_microcents !== summary.balance_microcents) {
    balance.classList.add("changed");
    setTimeout(() => balance.classList.remove("changed"), 1200);
  }
  $("creator-settled").textContent = formatMicro(summary.settled_microcents, currency);
  $("creator-earned").textContent = formatMicro(summary.earned_microcents, currency);
  $("creator-paid-out").textContent = formatMinor(summary.paid_out_cents, currency);
  $("creator-debt-fact").hidden = summary.debt_microcents <= 0;
  $("creator-debt").textContent = formatMicro(summary.debt_microcents, currency);

  renderEarnings(summary.recent_earnings, currency);
  renderPayouts(summary.payouts);
  renderListings(listings);
}

async function loadCreator(): Promise<void> {
  const current = session;
  if (!current) return;
  try {
    const summary = await client.creator();
    const listings = summary ? await client.listings() : [];
    if (session !== current) return; // signed out (or in as someone else) meanwhile
    renderCreator(
      summary,
      listings.filter((listing) => listing.creator_id === current.userId),
    );
  } catch (error) {
    $("creator").setAttribute("aria-busy", "false");
    fail(error, "load");
  }
}

/** Onboarding (a first time or to continue) or the Express dashboard: Stripe's page, in this
 * tab, as Checkout opens. */
async function openStripe(
  button: HTMLButtonElement,
  link: () => Promise<{ url: string }>,
): Promise<void> {
  clearError();
  const label = button.textContent;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.textContent = "Opening Stripe…";
  try {
    const { url } = await link();
    window.location.assign(url);
  } catch (error) {
    fail(error, "creator");
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.textContent = label;
    if (!$("error").hidden) button.focus();
  }
}

// --- actions -------------------------------------------------------------------------------

async function loadLedger(): Promise<void> {
  try {
    renderLedger(await client.ledger(10));
  } catch (error) {
    fail(error, "load");
  }
}

function loadStripeJs(): Promise<void> {
  if (window.Stripe) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = "https://js.stripe.com/v3/";
    script.onload = () => resolve();
    script.onerror = () => reject(new Error("Stripe.js could not be loaded"));
    document.head.append(script);
  });
}

async function payHere(product: Product, button: HTMLButtonElement): Promise<void> {
  const key = config.stripePublishableKey;
  if (!key) return;
  button.disabled = true;
  try {
    const { client_secret } = await client.paymentIntent(product.code);
    await loadStripeJs();
    const stripe = window.Stripe?.(key);
    if (!stripe) throw new Error("Stripe.js is not available");
    const elements = stripe.elements({ clientSecret: client_secret });
    elements.create("payment").mount("#payment-element");
    const form = $("payment") as HTMLFormElement;
    form.hidden = false;
    $("payment-title").textContent = `Pay for ${product.name} (${price(product)})`;
    form.onsubmit = async (event) => {
      event.preventDefault();
      const result = await stripe.confirmPayment({
        elements,
        confirmParams: { return_url: `${location.origin}${location.pathname}?checkout=success` },
      });
      if (result.error) fail(new Error(result.error.message ?? "the payment failed"), "checkout");
    };
    $("payment-submit").focus();
  } catch (error) {
    fail(error, "checkout");
  } finally {
    button.disabled = false;
  }
}

async function buy(product: Product, button: HTMLButtonElement): Promise<void> {
  clearError();
  const chosen = product.kind === "plan" ? planPrice(product) : null;
  if (chosen ? !chosen.purchasable : !product.purchasable) {
    showError(
      "This product can't be bought yet: it has no Stripe price. " +
        "(Developers: run `token-billing stripe sync-products`.)",
    );
    return;
  }
  const label = button.textContent;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.textContent = "Opening checkout…";
  try {
    const chosen = product.kind === "plan" ? planPrice(product) : null;
    const { url } = await client.checkout(product.code, chosen?.interval);
    window.location.assign(url);
  } catch (error) {
    fail(error, "checkout");
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.textContent = label;
    if (!$("error").hidden) button.focus();
  }
}

function stop(): void {
  stopLive?.();
  stopLive = null;
}

function signedOut(message?: string): void {
  stop();
  session = null;
  saveSession(null);
  shown = null;
  creatorShown = null;
  $("signed-in").hidden = true;
  $("account").hidden = true;
  // An error with its own "Sign in again" button replaces the sign-in card.
  $("sign-in").hidden = !config.devSignIn || Boolean(message);
  if (message) showError(message, { signIn: true });
  else if (!config.devSignIn) {
    showError("You're signed out. Sign in through your app to see your tokens.");
  }
}

async function signIn(): Promise<void> {
  clearError();
  try {
    const dev = await client.devSession();
    session = { token: dev.access_token, userId: dev.user.id, email: dev.user.email };
    saveSession(session);
    await start();
    $("main").focus();
  } catch (error) {
    showError(plainWords(error, "sign-in"));
  }
}

async function startLive(current: Session): Promise<void> {
  const handlers: LiveHandlers = {
    onBalance: renderBalance,
    onState: renderLive,
    onAuthError: (error) => fail(error, "load"),
  };
  if (config.supabaseUrl && config.supabaseAnonKey) {
    stopLive = await realtimeBalance(
      {
        supabaseUrl: config.supabaseUrl,
        supabaseAnonKey: config.supabaseAnonKey,
        userId: current.userId,
        token: () => session?.token ?? null,
        read: () => client.balance(),
      },
      handlers,
    );
  } else {
    stopLive = streamBalance(client, handlers);
  }
}

async function start(): Promise<void> {
  const current = session;
  if (!current) return;
  $("sign-in").hidden = true;
  $("account-email").textContent = current.email;
  $("account").hidden = false;
  $("signed-in").hidden = false;
  try {
    const [balance, products, entries, plan] = await Promise.all([
      client.balance(),
      client.products(),
      client.ledger(10),
      client.entitlements(),
    ]);
    renderEntitlements(plan);
    renderBalance(balance);
    renderProducts(products);
    renderLedger(entries);
  } catch (error) {
    fail(error, "load");
    return;
  }
  // On its own: a creator's figures coming late (or not at all) keeps the balance live.
  void loadCreator();
  stop();
  await startLive(current);
}

function checkoutReturn(): void {
  const params = new URLSearchParams(window.location.search);
  const outcome = params.get("checkout");
  if (outcome === "success") {
    showNotice(
      "Payment received. Your tokens appear here as soon as Stripe confirms it, usually within seconds.",
    );
  } else if (outcome === "cancel") {
    showNotice("Checkout cancelled. Nothing was charged.");
  }
  // Stripe's onboarding sends the creator back here (return_url) or, when its link expired,
  // to ask for a new one (refresh_url).
  const creator = params.get("creator");
  if (creator === "onboarded") {
    showNotice(
      "Welcome back from Stripe. Your account's state is in the Creator section; Stripe may take a minute to confirm your details.",
    );
  } else if (creator === "refresh") {
    showNotice(
      "The Stripe link expired (each link works once, for a few minutes). Open it again from the Creator section.",
    );
  }
  if (outcome || creator) window.history.replaceState(null, "", window.location.pathname);
}

async function boot(): Promise<void> {
  try {
    const response = await fetch("config.json", { cache: "no-store" });
    if (response.ok) config = { ...config, ...((await response.json()) as Partial<Config>) };
  } catch {
    // No config.json: same-origin API, no Realtime, no demo sign-in.
  }
  client = new TokenBillingApi(config.apiUrl, () => session?.token ?? null);
  $("sign-in-button").addEventListener("click", () => void signIn());
  $("error-sign-in").addEventListener("click", () => void signIn());
  $("sign-out").addEventListener("click", () => signedOut());
  const onboard = $<HTMLButtonElement>("creator-onboard");
  onboard.addEventListener("click", () => void openStripe(onboard, () => client.creatorOnboarding()));
  const again = $<HTMLButtonElement>("creator-continue");
  again.addEventListener("click", () => void openStripe(again, () => client.creatorOnboarding()));
  const dashboard = $<HTMLButtonElement>("creator-dashboard");
  dashboard.addEventListener("click", () => void openStripe(dashboard, () => client.creatorDashboard()));
  $("creator-refresh").addEventListener("click", () => void loadCreator());
  for (const radio of document.querySelectorAll<HTMLInputElement>('input[name="interval"]')) {
    radio.addEventListener("change", () => renderProducts(catalog));
  }
  window.addEventListener("pagehide", stop);
  checkoutReturn();
  if (session) await start();
  else signedOut();
}

void boot();
