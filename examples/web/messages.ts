// Errors in plain words: what happened, whether money moved, and what the person can do.

import { ApiFailure } from "./api";

export type Context = "load" | "checkout" | "sign-in" | "creator";

export function isExpired(error: unknown): boolean {
  return error instanceof ApiFailure && error.status === 401;
}

export function plainWords(error: unknown, context: Context): string {
  if (!(error instanceof ApiFailure)) {
    return "Something went wrong in this page. Reload it and try again.";
  }
  if (error.status === 0) {
    if (context === "creator") {
      return "We can't reach the billing service, so Stripe didn't open. Check your connection and try again.";
    }
    return context === "checkout"
      ? "We can't reach the billing service, so checkout didn't open. Nothing was charged. Check your connection and try again."
      : "We can't reach the billing service. Check your connection; the page keeps trying.";
  }
  if (error.status === 401) {
    return /expired/i.test(error.message)
      ? "Your session has expired. Sign in again to see your balance and buy tokens."
      : "You're signed out. Sign in to see your balance and buy tokens.";
  }
  if (context === "creator") {
    const words = creatorWords(error.code);
    if (words) return words;
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

/** What went wrong with onboarding or the Stripe dashboard, when it is about being a creator. */
function creatorWords(code: string): string | null {
  switch (code) {
    case "anonymous_user":
      return "Guest accounts can't sell agents. Add an email address to your account first.";
    case "not_a_creator":
      return "You're not a creator yet. Choose \"Sell your agents\" to set up your Stripe account.";
    case "onboarding_incomplete":
      return "Your Stripe onboarding isn't finished, so there is no dashboard yet. Choose \"Continue onboarding\".";
    case "creator_conflict":
      return "Your account is linked to another Stripe account. Please contact support.";
    case "stripe_unavailable":
    case "stripe_busy":
      return "We couldn't reach Stripe, so it didn't open. Please try again in a minute.";
    case "stripe_error":
    case "stripe_misconfigured":
    case "stripe_not_configured":
      return "Stripe couldn't open the page for your account. Please try again later.";
    default:
      return null;
  }
}

/** One of Stripe's requirement fields (requirements.currently_due) as what the person gives. */
export function requirementInWords(field: string): string {
  const last = field.slice(field.lastIndexOf(".") + 1);
  if (field === "external_account") return "A bank account or debit card for your payouts";
  if (field.startsWith("tos_acceptance")) return "Accepting Stripe's terms of service";
  if (field === "business_type") return "What kind of business you are";
  if (field.startsWith("business_profile")) return "Details of your business: its website and what it sells";
  if (field.includes("verification.additional_document")) return "A document that proves your address";
  if (field.includes("verification")) return "A photo of an identity document";
  if (field.includes(".dob")) return "Your date of birth";
  if (field.includes(".address")) return "Your address";
  if (last === "ssn_last_4" || last === "id_number") return "Your tax ID (SSN or national ID number)";
  if (last === "first_name" || last === "last_name") return "Your name";
  if (last === "email") return "Your email address";
  if (last === "phone") return "Your phone number";
  if (field.startsWith("company")) return "Details of your company";
  if (/^(representative|owners|directors|executives|person_)/.test(field)) {
    return "Details of the people who own or run the business";
  }
  return `Other information Stripe asks for (${field})`;
}

/** Stripe's requirements.disabled_reason, said plainly. */
export function disabledInWords(reason: string): string {
  if (reason === "requirements.past_due") {
    return "Stripe paused your account until it gets the information below.";
  }
  if (reason === "requirements.pending_verification") {
    return "Stripe is checking the information you gave. This usually takes minutes, sometimes a day or two.";
  }
  if (reason === "under_review" || reason === "listed") return "Stripe is reviewing your account.";
  if (reason.startsWith("rejected")) {
    return "Stripe closed your account for payments. Contact Stripe support to find out more.";
  }
  if (reason === "platform_paused") return "We paused your account. Please contact support.";
  return "Stripe turned off payments for your account for now. Open the Stripe dashboard to see why.";
}
