-- Migration: the idempotency keys token-billing writes for itself are its own.
--
-- Purpose: the ledger's idempotency keys are one namespace (unique across the ledger), shared by
-- callers' keys and the keys the functions make: `signup:<user>` (the signup grant),
-- `expiry:<bucket>` (expire_tokens), `reservation:<id>` (settle_reservation) and `stripe:...`
-- (handle_stripe_event). A caller that passes one of those shapes as its own key -- typically a
-- backend that forwards a client's request id as the key -- would take the key first, and the
-- function that owns it would then fail on the unique constraint every time it runs: one
-- `deduct_tokens(..., 'expiry:42')` stopped expire_tokens (the pg_cron job) for every user,
-- leaving expired tokens spendable and abandoned holds reserved forever; one
-- `deduct_tokens(..., 'reservation:<id>')` made that reservation impossible to settle.
-- tests/test_hostile_input.py (key squatting) guards this.
-- Objects: check constraint ledger_entries_internal_key on billing.ledger_entries.
--
-- Each internal shape is accepted only on the entry it describes: the signup grant, an expiry,
-- the settlement of that very reservation, or a Stripe effect (which records its event id).
-- Anything else is refused with SQLSTATE 23514 and nothing is written. A check constraint, not
-- a trigger: it costs the hot path (deduct_tokens) nothing measurable.
-- `not valid`: rows written before this migration are not re-read (a squatted key, if any, is
-- history; it stays); every new row is checked.

alter table billing.ledger_entries
add constraint ledger_entries_internal_key check (
  (idempotency_key not like 'signup:%' or kind = 'signup')
  and (idempotency_key not like 'expiry:%' or kind = 'expiry')
  and (
    idempotency_key not like 'reservation:%'
    -- Spelled out for a null reservation_id: a check that evaluates to null passes.
    or (reservation_id is not null and idempotency_key = 'reservation:' || reservation_id::text)
  )
  and (
    idempotency_key not like 'stripe:%'
    or (
      kind in ('purchase', 'subscription', 'clawback', 'dispute', 'dispute_won')
      and metadata ? 'stripe_event_id'
    )
  )
) not valid;

comment on constraint ledger_entries_internal_key on billing.ledger_entries is
'Keys shaped like the ones token-billing makes (signup:, expiry:, reservation:, stripe:) only on '
'the entries that make them: a caller cannot take a key a function will need.';
