-- Migration: token accounts.
--
-- Purpose: one row per user holding the balance, the tokens held by pending reservations and the
-- plan. It is the row a browser subscribes to through Supabase Realtime, so it is a member of the
-- supabase_realtime publication and readable by its owner through RLS.
-- Objects: billing.accounts, its RLS policy, its membership of supabase_realtime.
--
-- There is deliberately no foreign key to auth.users: the ledger is a financial record and
-- outlives the user (deleting a user in the dashboard must not be blocked, nor erase history).

-- One function holds the row rules, for the reason given at billing.ledger_entry_is_valid: a
-- CHECK is parsed again by every statement that writes the table, and a function call is short.
create function billing.account_is_valid(
  p_reserved bigint,
  p_undrawn bigint,
  p_subscription_status text
) returns boolean
language plpgsql immutable
set search_path = ''
as $$
begin
  return coalesce(
    p_reserved >= 0
    and p_undrawn >= 0
    and p_subscription_status in (
      'none', 'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled',
      'unpaid', 'paused'
    ),
    false
  );
end;
$$;

comment on function billing.account_is_valid(bigint, bigint, text) is
'CHECK of billing.accounts: reserved and undrawn not negative, subscription_status one of '
'Stripe''s subscription statuses or none.';

revoke all on function billing.account_is_valid(bigint, bigint, text) from public;

create table billing.accounts (
  user_id uuid primary key,
  balance bigint not null default 0,
  reserved bigint not null default 0,
  undrawn bigint not null default 0,
  plan text not null default 'free' references billing.products (code) on update cascade,
  subscription_status text not null default 'none',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint accounts_valid check (
    billing.account_is_valid(reserved, undrawn, subscription_status)
  )
)
-- Balance updates are the hot path: room on each page keeps them HOT (no index touches).
with (fillfactor = 80);

comment on table billing.accounts is
'One row per user. Invariant at every commit: balance = sum of the user''s ledger entries and '
'reserved = sum of the user''s pending reservations. Written only by token-billing functions.';
comment on column billing.accounts.user_id is 'The user (auth.users.id).';
comment on column billing.accounts.balance is
'Tokens owned: the running sum of ledger entries. Negative only after a refund or lost dispute '
'(debt); usage is refused until a credit brings it above zero.';
comment on column billing.accounts.reserved is
'Tokens held by pending reservations; available = balance - reserved, never taken below zero '
'by usage.';
comment on column billing.accounts.undrawn is
'Tokens debited since the buckets were last drawn. Usage only moves this counter (the hot path '
'touches no bucket); the next credit or expiry draws it from the buckets in consumption order.';
comment on column billing.accounts.plan is 'Current plan (a billing.products code of kind plan).';
comment on column billing.accounts.subscription_status is
'Stripe subscription status of the current plan, or none.';
comment on column billing.accounts.created_at is 'When the account was opened.';
comment on column billing.accounts.updated_at is 'When balance, reservation or plan last changed.';

alter table billing.accounts enable row level security;

create policy accounts_select_own on billing.accounts
for select to authenticated
using (user_id = (select auth.uid()));

revoke all on billing.accounts from public, anon, authenticated, service_role;
grant select on billing.accounts to authenticated, service_role;

-- Realtime: the host application owns the publication; add the table only if it is missing.
do $publication$
begin
  if exists (select 1 from pg_catalog.pg_publication where pubname = 'supabase_realtime')
    and not exists (
      select 1
      from pg_catalog.pg_publication_tables
      where pubname = 'supabase_realtime' and schemaname = 'billing' and tablename = 'accounts'
    ) then
    alter publication supabase_realtime add table billing.accounts;
  end if;
end
$publication$;

insert into billing.schema_migrations (version, name) values ('20261121000300', 'accounts');
