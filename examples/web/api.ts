// The token-billing HTTP API as the browser calls it: every call but the catalog carries the
// user's Supabase access token. Errors come back as ApiFailure with the service's error code.

export interface Balance {
  balance: number;
  available: number;
  reserved: number;
  plan: string;
  subscription_status: string;
}

export interface ProductPrice {
  interval: "month" | "year";
  currency: string;
  unit_amount: number;
  purchasable: boolean;
}

/** What the plan entitles the user to (public.my_entitlements()). */
export interface Entitlements {
  plan: string;
  subscription_status: string;
  entitled_plan: string;
  limits: Record<string, number | null>;
  features: string[];
  grace_until: string | null;
  period_tokens: number;
}

export interface Product {
  code: string;
  kind: "pack" | "plan";
  name: string;
  description: string | null;
  tokens: number;
  price_cents: number | null;
  currency: string | null;
  purchasable: boolean;
  prices: ProductPrice[];
}

export interface LedgerEntry {
  id: number;
  amount: number;
  balance_after: number;
  kind: string;
  description: string | null;
  created_at: string;
}

/** One entry of the creator's earnings ledger; amounts in micro-cents (10^6 a cent). */
export interface CreatorEarning {
  id: number;
  kind: string;
  amount_microcents: number;
  balance_microcents: number;
  product_code: string | null;
  tokens: number | null;
  created_at: string;
}

export interface CreatorPayout {
  id: string;
  period: string;
  amount_cents: number;
  currency: string;
  status: "pending" | "paid" | "failed";
  stripe_transfer_id: string | null;
  reversed_cents: number;
}

/** GET /v1/creators/me: the Stripe account's state, the earnings (micro-cents) and payouts. */
export interface CreatorSummary {
  stripe_account_id: string;
  charges_enabled: boolean;
  payouts_enabled: boolean;
  details_submitted: boolean;
  requirements_due: string[];
  disabled_reason: string | null;
  deauthorized_at: string | null;
  commission_bps: number;
  currency: string;
  balance_microcents: number;
  settled_microcents: number;
  earned_microcents: number;
  debt_microcents: number;
  paid_out_cents: number;
  recent_earnings: CreatorEarning[];
  payouts: CreatorPayout[];
}

/** An agent of the marketplace (GET /v1/listings). */
export interface Listing {
  code: string;
  name: string;
  description: string | null;
  price_cents: number | null;
  currency: string;
  tokens_per_run: number;
  creator_id: string;
  purchasable: boolean;
}

export interface DevSession {
  access_token: string;
  expires_in: number;
  user: { id: string; email: string };
}

/** A failed call: `status` 0 means the service could not be reached at all. */
export class ApiFailure extends Error {
  readonly status: number;
  readonly code: string;

  constructor(status: number, code: string, message: string) {
    super(message);
    this.name = "ApiFailure";
    this.status = status;
    this.code = code;
  }
}

export async function failureOf(response: Response): Promise<ApiFailure> {
  let code = "http_" + response.status;
  let message = response.statusText || "request failed";
  try {
    const body = (await response.json()) as { error?: { code?: string; message?: string } };
    if (body.error?.code) code = body.error.code;
    if (body.error?.message) message = body.error.message;
  } catch {
    // Not JSON (a proxy's error page): keep the status.
  }
  return new ApiFailure(response.status, code, message);
}

export class TokenBillingApi {
  constructor(
    private readonly baseUrl: string,
    private readonly token: () => string | null,
  ) {}

  url(path: string): string {
    return this.baseUrl.replace(/\/$/, "") + path;
  }

  headers(): Record<string, string> {
    const token = this.token();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  private async call<T>(path: string, init: RequestInit = {}): Promise<T> {
    let response: Response;
    try {
      response = await fetch(this.url(path), {
        ...init,
        headers: { Accept: "application/json", ...this.headers(), ...(init.headers ?? {}) },
      });
    } catch (error) {
      throw new ApiFailure(0, "network_error", String(error));
    }
    if (!response.ok) throw await failureOf(response);
    return (await response.json()) as T;
  }

  balance(): Promise<Balance> {
    return this.call<Balance>("/v1/balance");
  }

  entitlements(): Promise<Entitlements> {
    return this.call<Entitlements>("/v1/entitlements");
  }

  async products(): Promise<Product[]> {
    return (await this.call<{ products: Product[] }>("/v1/products")).products;
  }

  async ledger(limit = 20): Promise<LedgerEntry[]> {
    return (await this.call<{ entries: LedgerEntry[] }>(`/v1/ledger?limit=${limit}`)).entries;
  }

  /** A Stripe Checkout Session for the product (a plan: at the interval's price); the caller
   * redirects to its url. */
  checkout(product: string, interval?: "month" | "year"): Promise<{ id: string; url: string }> {
    return this.call("/v1/checkout/sessions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(interval ? { product, quantity: 1, interval } : { product, quantity: 1 }),
    });
  }

  /** A PaymentIntent for a pack, for Stripe's Payment Element (mounted with its client_secret). */
  paymentIntent(product: string): Promise<{ id: string; client_secret: string }> {
    return this.call("/v1/payment-intents", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify({ product, quantity: 1 }),
    });
  }

  /** The signed-in user's creator account, or null when the user is not a creator yet. */
  async creator(): Promise<CreatorSummary | null> {
    try {
      return await this.call<CreatorSummary>("/v1/creators/me");
    } catch (error) {
      if (error instanceof ApiFailure && error.code === "not_a_creator") return null;
      throw error;
    }
  }

  /** Become a creator (the Stripe Express account is made once): Stripe's onboarding link, a
   * single-use URL the caller redirects to. */
  creatorOnboarding(): Promise<{ stripe_account_id: string; url: string }> {
    return this.call("/v1/creators/onboard", {
      method: "POST",
      headers: { "Idempotency-Key": crypto.randomUUID() },
    });
  }

  /** A login link to the creator's Stripe Express dashboard (single use). */
  creatorDashboard(): Promise<{ url: string }> {
    return this.call("/v1/creators/dashboard", {
      method: "POST",
      headers: { "Idempotency-Key": crypto.randomUUID() },
    });
  }

  /** The marketplace's active listings (no token needed). */
  async listings(): Promise<Listing[]> {
    return (await this.call<{ listings: Listing[] }>("/v1/listings")).listings;
  }

  /** Development only: a token for the demo user (the route 404s in production). */
  devSession(): Promise<DevSession> {
    return this.call<DevSession>("/dev/session", { method: "POST" });
  }
}
