// Errors in plain words: what happened, whether money moved, and what the person can do.

import { ApiFailure } from "./api";

export type Context = "load" | "checkout" | "sign-in";

export function isExpired(error: unknown): boolean {
  return error instanceof ApiFailure && error.status === 401;
}

export function plainWords(error: unknown, context: Context): string {
  if (!(error instanceof ApiFailure)) {
    return "Something went wrong in this page. Reload it and try again.";
  }
  if (error.status === 0) {
    return context === "checkout"
      ? "We can't reach the billing service, so checkout didn't open. Nothing was charged. Check your connection and try again."
      : "We can't reach the billing service. Check your connection; the page keeps trying.";
  }
  if (error.status === 401) {
    return /expired/i.test(error.message)
      ? "Your session has expired. Sign in again to see your balance and buy tokens."
      : "You're signed out. Sign in to see your balance and buy tokens.";
  }
  switch (error.code) {
    case "anonymous_user":
      return "Guest accounts can't buy tokens. Add an email address to your account first.";
    case "stripe_unavailable":
      return "We couldn't reach the payment provider, so checkout didn't open. Nothing was charged. Please try again in a minute.";
    case "stripe_busy":
      return "The payment provider is busy right now. Nothing was charged. Please try again in a few seconds.";
    case "stripe_error":
    case "stripe_misconfigured":
      return "The payment provider couldn't start checkout. Nothing was charged. Please try again later.";
    case "product_not_priced":
      return "This product can't be bought yet: it has no Stripe price. (Developers: run `token-billing stripe sync-products`.)";
    case "unknown_product":
      return "This product is no longer for sale. Reload the page to see the current catalog.";
    case "already_subscribed":
      return "You already have a plan. Change or cancel it in the billing portal.";
    case "unknown_account":
      return "There is no token account for this user yet. Sign out and in again, or contact support.";
    case "dev_sign_in_unavailable":
      return "Demo sign-in isn't available on this server.";
    case "database_unavailable":
    case "database_busy":
    case "database_timeout":
      return "The billing service is busy. Please try again in a moment.";
    default:
      return context === "checkout"
        ? "Checkout couldn't start because of a problem on our side. Nothing was charged. Please try again."
        : "Something went wrong on our side. Please try again in a moment.";
  }
}
