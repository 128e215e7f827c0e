-- Migration: the billing schema and its privilege baseline.
--
-- Purpose: every piece of billing state lives in the private schema `billing`; the browser and
-- the Data API reach it only through the functions in `public` (RPCs) and through row-level
-- security on the few tables a signed-in user may read.
-- Objects: schema billing, its default privileges.
--
-- Errors raised by the token-billing functions (SQLSTATE, meaning):
--   22023  invalid argument: null, non-positive or oversized amount, null or empty or oversized
--          key, unknown kind, malformed Stripe event. The message names the argument.
--   TBKEY  idempotency key reused with different arguments. Nothing was written.
--   TBRES  reservation not found.
--   TBAPP  append-only violation: a ledger entry, or a resolved reservation, cannot be changed.
--   TBCUS  Stripe customer already linked to another user. Nothing was written.
--   22023  also: an idempotency key shaped like one token-billing makes for itself (signup:,
--          expiry:, reservation:, stripe:); the check constraint ledger_entries_valid
--          (23514) is the backstop for any other writer. Nothing was written.
--   22xxx  other data exceptions, raised by Postgres while reading an argument: 22P02 not a
--          uuid or not JSON, 22P05 \u0000 in JSON, 22007/22008 a timestamp or interval that is
--          malformed or out of range, 22003 a balance that would leave bigint.

create schema if not exists billing;

comment on schema billing is
'token-billing state: accounts, ledger, credit buckets, reservations, catalog, Stripe records. '
'Private: not exposed through the Data API; written only by the token-billing functions.';

revoke all on schema billing from public;
grant usage on schema billing to authenticated, service_role;

-- Functions in billing are private helpers. PostgreSQL grants EXECUTE on every new function to
-- PUBLIC, and a per-schema default privilege cannot take that away (ALTER DEFAULT PRIVILEGES ...
-- IN SCHEMA only adds); changing the global defaults would change the host application's
-- functions too. So every migration revokes each function explicitly, right after creating it.
