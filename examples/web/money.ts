// Money from integer amounts, in integer arithmetic: the API's amounts are whole minor units
// (cents) or micro-cents (millionths of a cent, the creator earnings ledger), and dividing
// them as floating point numbers would print 0.1 + 0.2 mistakes. Digits are split with BigInt
// and only the integer part goes through Intl.NumberFormat, which places the currency sign and
// the group separators.

const LOCALE = "en-US";
const MICRO = 6; // micro-cents: six more digits than the minor unit

/** Digits of the currency's minor unit: 2 for USD, 0 for JPY, 3 for KWD. */
export function minorDigits(currency: string): number {
  const format = new Intl.NumberFormat(LOCALE, { style: "currency", currency: currency.toUpperCase() });
  return format.resolvedOptions().maximumFractionDigits ?? 2;
}

/** An integer as a BigInt. A JSON number above 2^53 has already lost digits; this keeps what
 * the number holds and refuses fractions, which no amount of the API has. */
function integer(amount: number | bigint): bigint {
  if (typeof amount === "bigint") return amount;
  if (!Number.isInteger(amount)) throw new RangeError(`not an integer amount: ${amount}`);
  return BigInt(amount);
}

/** `amount` counts 10^-scale of the currency's major unit; shown with `shown` decimals, the rest
 * cut off (toward zero, so a figure never shows more than there is). */
function format(amount: bigint, scale: number, shown: number, currency: string): string {
  const negative = amount < 0n;
  const magnitude = negative ? -amount : amount;
  const unit = 10n ** BigInt(scale);
  const major = magnitude / unit;
  const fraction = (magnitude % unit).toString().padStart(scale, "0").slice(0, shown);
  const parts = new Intl.NumberFormat(LOCALE, {
    style: "currency",
    currency: currency.toUpperCase(),
    minimumFractionDigits: shown,
    maximumFractionDigits: shown,
  }).formatToParts(major);
  const text = parts.map((part) => (part.type === "fraction" ? fraction : part.value)).join("");
  const zero = major === 0n && !/[1-9]/.test(fraction);
  return negative && !zero ? `−${text}` : text;
}

/** Minor units (cents) as money: 1999 usd is "$19.99", -5 usd "−$0.05", 500 jpy "¥500". */
export function formatMinor(amount: number | bigint, currency: string): string {
  const digits = minorDigits(currency);
  return format(integer(amount), digits, digits, currency);
}

/** Micro-cents as money in whole minor units, the fraction cut off: 55999992 usd is "$0.55",
 * what a payout (whole cents) could take of it. */
export function formatMicro(amount: number | bigint, currency: string): string {
  const digits = minorDigits(currency);
  return format(integer(amount), digits + MICRO, digits, currency);
}

/** Micro-cents to the last digit, trailing zeros dropped down to the minor unit: 55999992 usd
 * is "$0.55999992", 55000000 usd "$0.55". */
export function formatMicroExact(amount: number | bigint, currency: string): string {
  const value = integer(amount);
  const digits = minorDigits(currency);
  const scale = digits + MICRO;
  let shown = scale;
  let rest = value < 0n ? -value : value;
  while (shown > digits && rest % 10n === 0n) {
    rest /= 10n;
    shown -= 1;
  }
  return format(value, scale, shown, currency);
}

/** True when micro-cents are not a whole number of minor units (a fraction of a cent). */
export function hasFraction(amount: number | bigint): boolean {
  return integer(amount) % 10n ** BigInt(MICRO) !== 0n;
}
