-- Migration: short plain CHECKs on the hot tables, the per-writer rules in the writers.
--
-- Purpose: every debit updates billing.accounts and inserts into billing.ledger_entries. Their
-- released CHECKs each called a plpgsql function (billing.account_is_valid,
-- billing.ledger_entry_is_valid): a function call and a search_path switch per row, on every
-- update of a hot row, 11 us of a ~50 us debit. They become short plain CHECKs, which Postgres
-- evaluates inline, and a lookup table:
--   * billing.accounts: one plain CHECK (reserved and undrawn not negative, held_expired between
--     0 and reserved: the rule of 20261202100000_holds_and_expiry.sql, whose function-backed
--     accounts_valid this replaces); subscription_status a foreign key to
--     billing.subscription_statuses, which Postgres checks only when the status changes (never
--     on a balance update).
--   * billing.ledger_entries: one CHECK, no entry of 0 (see below for why no more).
-- What a CHECK no longer holds is a per-writer rule: each token-billing function writes only
-- known kinds, and only the keys of its own namespace (signup:, expiry:, reservation:,
-- stripe:) on the entries they describe (add_tokens, deduct_tokens and deduct_tokens_batch
-- refuse them from callers with 22023). billing.check_invariants() reports any entry that breaks
-- one (20261202400100_fast_ledger.sql), and no API role can write a table directly.
-- Objects: billing.subscription_statuses; constraints of billing.accounts and
--   billing.ledger_entries; drops billing.account_row_is_valid() (and billing.account_is_valid()
--   where it still exists), billing.ledger_entry_is_valid().

create table billing.subscription_statuses (
  status text primary key
);

comment on table billing.subscription_statuses is
'The values of billing.accounts.subscription_status: Stripe''s subscription statuses, and none.';
comment on column billing.subscription_statuses.status is 'A subscription status.';

insert into billing.subscription_statuses (status)
values
('none'), ('incomplete'), ('incomplete_expired'), ('trialing'), ('active'), ('past_due'),
('canceled'), ('unpaid'), ('paused');

-- No policy: read by the foreign key only (service role and owner).
alter table billing.subscription_statuses enable row level security;

revoke all on billing.subscription_statuses from public, anon, authenticated, service_role;
grant select on billing.subscription_statuses to service_role;

alter table billing.accounts
drop constraint if exists accounts_valid,
-- One constraint, for the reason given at ledger_entries_shape below.
add constraint accounts_row_valid check (
  reserved >= 0 and undrawn >= 0 and held_expired between 0 and reserved
),
add constraint accounts_subscription_status_known
foreign key (subscription_status) references billing.subscription_statuses (status);

comment on constraint accounts_row_valid on billing.accounts is
'reserved and undrawn not negative; held_expired (held tokens whose bucket expired) between 0 '
'and reserved.';

drop function if exists billing.account_row_is_valid(bigint, bigint, bigint, text);
drop function if exists billing.account_is_valid(bigint, bigint, text);

alter table billing.ledger_entries
drop constraint if exists ledger_entries_valid,
-- Postgres 15 parses and plans each CHECK of a table again for every statement that writes it
-- (ExecRelCheck), and every debit writes this table: a CHECK with text constants and function
-- calls was the costliest part of a debit (bench/results/history.md). So the CHECK keeps what
-- is cheap, and the sign rule, the key length and the metadata type are the
-- writers' (each writes one kind with its sign, checks keys and metadata of callers), reported
-- by billing.check_invariants().
add constraint ledger_entries_shape check (amount <> 0);

comment on constraint ledger_entries_shape on billing.ledger_entries is
'No entry of 0. The sign of each kind (usage, expiry, clawback, dispute negative; every other '
'positive), a key of 1..255 characters, metadata an object, known kinds and key namespaces '
'are the writers'' rules, reported by billing.check_invariants().';

drop function if exists billing.ledger_entry_is_valid(text, bigint, text, uuid, jsonb);

insert into billing.schema_migrations (version, name) values ('20261202400000', 'plain_checks');
