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

  /** Development only: a token for the demo user (the route 404s in production). */
  devSession(): Promise<DevSession> {
    return this.call<DevSession>("/dev/session", { method: "POST" });
  }
}
