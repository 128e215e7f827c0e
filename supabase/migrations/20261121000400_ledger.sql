-- Migration: the append-only ledger, credit buckets, and the two balance-changing primitives.
--
-- Purpose: every change of a balance is one ledger entry, written in the same statement sequence
-- that changes billing.accounts, under the account's row lock. Credits land in buckets with an
-- optional expiry; debits consume the buckets that expire soonest first, then never-expiring
-- ones oldest first.
-- Objects: billing.ledger_entries (+ append-only trigger), billing.credit_buckets,
--   billing.credit(), billing.debit(), billing.consume_buckets(), billing.replay_entry(),
--   public.add_tokens(), public.deduct_tokens().
--
-- Concurrency: every function locks the account row first (the update of billing.accounts),
-- then touches that user's buckets and reservations. One lock order, no deadlocks.
--
-- The hot path is one statement: a debit updates the account (lock, funds check, new balance)
-- and inserts its entry in a single statement, and touches no bucket. It only adds the amount to
-- accounts.undrawn; the next credit or expiry of that user draws the undrawn tokens from the
-- buckets in consumption order before it changes them. Between two draws no bucket is added or
-- removed, so drawing late takes exactly the tokens drawing at once would have.
--
-- ledger_entries.user_id has no foreign key: every entry is written in the statement that
-- updates (and so proves) its account, and a foreign key would add a query per entry to the hot
-- path. billing.check_invariants() reports an entry without an account.
--
-- Idempotency: ledger_entries.idempotency_key is unique across the ledger. The fast path does
-- not look the key up first: it debits, then inserts `on conflict do nothing`; only when the key
-- already exists does it undo the debit (still under the same lock, so nobody saw it) and answer
-- `duplicate`, or raise TBKEY when the first call had other arguments.
--
-- Buckets hold exactly the positive part of the balance, less what is undrawn:
-- greatest(sum(remaining) - undrawn, 0) = greatest(balance, 0). A credit first pays off debt,
-- then the rest lands in its bucket.

-- The rules of a ledger row live in one function that its single CHECK calls. Postgres 15 keeps
-- a CHECK as text and parses it again at the start of every statement that writes the table, so
-- long constant lists would be parsed on every debit; a call with five column references is
-- short, and the function body is compiled once per session.
create function billing.ledger_entry_is_valid(
  p_kind text,
  p_amount bigint,
  p_idempotency_key text,
  p_reservation_id uuid,
  p_metadata jsonb
) returns boolean
language plpgsql immutable
set search_path = ''
as $$
begin
  return coalesce(
    -- Credits are positive, debits negative.
    (
      (
        p_kind in (
          'purchase', 'subscription', 'promotion', 'adjustment', 'refund', 'signup', 'dispute_won'
        ) and p_amount > 0
      )
      or (p_kind in ('usage', 'expiry', 'clawback', 'dispute') and p_amount < 0)
    )
    and length(p_idempotency_key) between 1 and 255
    and jsonb_typeof(p_metadata) = 'object'
    -- Keys shaped like the ones token-billing makes for itself are accepted only on the entry
    -- they describe. Callers' keys share the ledger's one namespace: a caller's 'expiry:42' or
    -- 'reservation:<id>' would otherwise take the key first and make expire_tokens (the pg_cron
    -- job, for every user) or that settlement fail on the unique constraint from then on.
    -- add_tokens and deduct_tokens refuse such keys with 22023 first; this is the backstop for
    -- any other writer (23514).
    and (p_idempotency_key not like 'signup:%' or p_kind = 'signup')
    and (p_idempotency_key not like 'expiry:%' or p_kind = 'expiry')
    and (
      p_idempotency_key not like 'reservation:%'
      or p_idempotency_key = 'reservation:' || p_reservation_id::text
    )
    and (
      p_idempotency_key not like 'stripe:%'
      or (
        p_kind in ('purchase', 'subscription', 'clawback', 'dispute', 'dispute_won')
        and p_metadata ? 'stripe_event_id'
      )
    ),
    -- A rule that evaluates to null (a null reservation_id above) is a violation, not a pass.
    false
  );
end;
$$;

comment on function billing.ledger_entry_is_valid(text, bigint, text, uuid, jsonb) is
'CHECK of billing.ledger_entries: credits (purchase, subscription, promotion, adjustment, refund, '
'signup, dispute_won) positive, debits (usage, expiry, clawback, dispute) negative; a key of '
'1..255 characters; metadata an object; keys in token-billing''s own namespaces (signup:, '
'expiry:, reservation:, stripe:) only on the entries they describe.';

revoke all on function billing.ledger_entry_is_valid(text, bigint, text, uuid, jsonb) from public;

create table billing.ledger_entries (
  id bigint generated always as identity primary key,
  user_id uuid not null,
  amount bigint not null,
  balance_after bigint not null,
  kind text not null,
  idempotency_key text not null,
  reservation_id uuid,
  description text,
  metadata jsonb not null default '{}',
  created_at timestamptz not null default now(),
  constraint ledger_entries_idempotency_key_unique unique (idempotency_key),
  constraint ledger_entries_valid check (
    billing.ledger_entry_is_valid(kind, amount, idempotency_key, reservation_id, metadata)
  )
);

create index ledger_entries_user_id_id_idx on billing.ledger_entries (user_id, id);

comment on table billing.ledger_entries is
'Append-only ledger: one row per balance change. No role can update or delete a row (trigger). '
'For each user, entries ordered by id are a running sum whose last balance_after is the balance.';
comment on column billing.ledger_entries.id is 'Entry id; increases in the order entries applied.';
comment on column billing.ledger_entries.user_id is 'The account this entry changed.';
comment on column billing.ledger_entries.amount is 'Signed tokens: credits positive, debits negative.';
comment on column billing.ledger_entries.balance_after is 'The account balance right after this entry.';
comment on column billing.ledger_entries.kind is
'Credits: purchase, subscription, promotion, adjustment, refund, signup, dispute_won. '
'Debits: usage, expiry, clawback, dispute. The sign of amount must match.';
comment on column billing.ledger_entries.idempotency_key is
'Unique across the ledger: the same key can only ever apply once.';
comment on column billing.ledger_entries.reservation_id is 'The reservation a settlement charged.';
comment on column billing.ledger_entries.description is 'Free text for people.';
comment on column billing.ledger_entries.metadata is 'A JSON object for machines (request ids, Stripe ids).';
comment on column billing.ledger_entries.created_at is 'When the entry was written.';

create function billing.tg_ledger_entries__refuse_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception using
    errcode = 'TBAPP',
    message = format('billing.ledger_entries is append-only: %s refused', tg_op),
    hint = 'Correct a balance with a new entry (add_tokens or deduct_tokens), never by editing one.';
end;
$$;

comment on function billing.tg_ledger_entries__refuse_change() is
'Trigger: refuses every update, delete and truncate of ledger entries, for every role.';

revoke all on function billing.tg_ledger_entries__refuse_change() from public;

create trigger tg_ledger_entries__10_refuse_change
before update or delete on billing.ledger_entries
for each row execute function billing.tg_ledger_entries__refuse_change();

create trigger tg_ledger_entries__11_refuse_truncate
before truncate on billing.ledger_entries
for each statement execute function billing.tg_ledger_entries__refuse_change();

alter table billing.ledger_entries enable row level security;

create policy ledger_entries_select_own on billing.ledger_entries
for select to authenticated
using (user_id = (select auth.uid()));

revoke all on billing.ledger_entries from public, anon, authenticated, service_role;
grant select on billing.ledger_entries to authenticated, service_role;

create table billing.credit_buckets (
  id bigint generated always as identity primary key,
  user_id uuid not null references billing.accounts (user_id),
  entry_id bigint not null unique references billing.ledger_entries (id),
  amount bigint not null,
  remaining bigint not null,
  expires_at timestamptz,
  expired_at timestamptz,
  created_at timestamptz not null default now(),
  constraint credit_buckets_amount_not_negative check (amount >= 0),
  constraint credit_buckets_remaining_within_amount check (remaining between 0 and amount),
  constraint credit_buckets_expired_empty check (expired_at is null or remaining = 0)
)
with (fillfactor = 80);

-- Deductions walk a user's live buckets in consumption order; this index returns them sorted.
create index credit_buckets_live_idx on billing.credit_buckets (user_id, expires_at, id)
where remaining > 0;
-- expire_tokens() finds the live buckets past their expiry.
create index credit_buckets_expiring_idx on billing.credit_buckets (expires_at)
where remaining > 0 and expires_at is not null;

comment on table billing.credit_buckets is
'Every credit lands in one bucket. Invariant: per user, sum(remaining) = greatest(balance, 0). '
'Debits consume soonest-expiring buckets first, then never-expiring ones oldest first.';
comment on column billing.credit_buckets.id is 'Bucket id; orders never-expiring buckets by age.';
comment on column billing.credit_buckets.user_id is 'Owner of the tokens.';
comment on column billing.credit_buckets.entry_id is 'The credit entry that filled this bucket.';
comment on column billing.credit_buckets.amount is
'Tokens placed in the bucket: the credit less any debt it paid off first.';
comment on column billing.credit_buckets.remaining is 'Tokens not yet consumed or expired; 0..amount.';
comment on column billing.credit_buckets.expires_at is 'When the remainder expires; null: never.';
comment on column billing.credit_buckets.expired_at is 'When expire_tokens wrote the expiry entry.';
comment on column billing.credit_buckets.created_at is 'When the bucket was filled.';

alter table billing.credit_buckets enable row level security;

create policy credit_buckets_select_own on billing.credit_buckets
for select to authenticated
using (user_id = (select auth.uid()));

revoke all on billing.credit_buckets from public, anon, authenticated, service_role;
grant select on billing.credit_buckets to authenticated, service_role;

-- Shared argument checks --------------------------------------------------------------------

create function billing.require_amount(p_name text, p_amount bigint) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000 then
    raise exception using
      errcode = '22023',
      message = format('%s must be a positive integer of at most 10^15, got %s',
        p_name, coalesce(p_amount::text, 'null'));
  end if;
end;
$$;

comment on function billing.require_amount(text, bigint) is
'Raises 22023 naming the argument unless 0 < amount <= 10^15 (no balance can then overflow).';

revoke all on function billing.require_amount(text, bigint) from public;

create function billing.require_key(p_name text, p_key text) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_key is null or length(btrim(p_key)) = 0 or length(p_key) > 255 then
    raise exception using
      errcode = '22023',
      message = format('%s must be a non-empty text of at most 255 characters', p_name);
  end if;
end;
$$;

comment on function billing.require_key(text, text) is
'Raises 22023 naming the argument unless the idempotency key is 1..255 characters, not blank.';

revoke all on function billing.require_key(text, text) from public;

create function billing.require_object(p_name text, p_value jsonb) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_value is not null and jsonb_typeof(p_value) <> 'object' then
    raise exception using
      errcode = '22023',
      message = format('%s must be a JSON object, got %s', p_name, jsonb_typeof(p_value));
  end if;
end;
$$;

comment on function billing.require_object(text, jsonb) is
'Raises 22023 naming the argument unless the value is null or a JSON object.';

revoke all on function billing.require_object(text, jsonb) from public;

create function billing.require_caller_key(p_name text, p_key text) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  perform billing.require_key(p_name, p_key);
  if p_key ~ '^(signup|expiry|reservation|stripe):' then
    raise exception using
      errcode = '22023',
      message = format(
        '%s must not start with signup:, expiry:, reservation: or stripe: (token-billing''s own keys)',
        p_name);
  end if;
end;
$$;

comment on function billing.require_caller_key(text, text) is
'Raises 22023 unless the key is valid and outside the namespaces token-billing writes itself '
'(signup:, expiry:, reservation:, stripe:), so a caller can never take a key a function needs.';

revoke all on function billing.require_caller_key(text, text) from public;

-- Replays -------------------------------------------------------------------------------------

create function billing.replay_entry(
  p_idempotency_key text,
  p_user_id uuid,
  p_amount bigint,
  p_kind text,
  p_expires_at timestamptz default null,
  p_compare_expiry boolean default false
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql stable
set search_path = ''
as $$
declare
  v_entry record;
begin
  select e.id, e.user_id, e.amount, e.kind, e.balance_after, b.expires_at
  into v_entry
  from billing.ledger_entries as e
  left join billing.credit_buckets as b on b.entry_id = e.id
  where e.idempotency_key = p_idempotency_key;

  if not found then
    return;
  end if;

  if v_entry.user_id is distinct from p_user_id
    or v_entry.amount <> p_amount
    or v_entry.kind <> p_kind
    or (p_compare_expiry and v_entry.expires_at is distinct from p_expires_at) then
    raise exception using
      errcode = 'TBKEY',
      message = format(
        'idempotency key %L was already used with different arguments (ledger entry %s)',
        p_idempotency_key, v_entry.id),
      hint = 'Use a new key for a new operation; repeat a key only to retry the same call.';
  end if;

  return query select 'duplicate'::text, v_entry.balance_after, v_entry.id;
end;
$$;

comment on function billing.replay_entry(text, uuid, bigint, text, timestamptz, boolean) is
'The first result of an idempotency key as status duplicate; no row if the key is unused; '
'raises TBKEY if the key was used for another user, amount, kind or expiry.';

revoke all on function billing.replay_entry(text, uuid, bigint, text, timestamptz, boolean) from public;

-- Primitives ----------------------------------------------------------------------------------

create function billing.consume_buckets(p_user_id uuid, p_amount bigint) returns void
language plpgsql
set search_path = ''
as $$
begin
  with live as (
    select
      b.id,
      b.remaining,
      sum(b.remaining) over (order by b.expires_at asc nulls last, b.id asc) - b.remaining
        as consumed_before
    from billing.credit_buckets as b
    where b.user_id = p_user_id and b.remaining > 0
  )

  update billing.credit_buckets as b
  set remaining = b.remaining - least(live.remaining, p_amount - live.consumed_before)
  from live
  where b.id = live.id and live.consumed_before < p_amount;
end;
$$;

comment on function billing.consume_buckets(uuid, bigint) is
'Takes p_amount from the user''s live buckets, soonest expiry first, then oldest never-expiring; '
'takes what there is when the buckets hold less (debt). Call only under the account lock.';

revoke all on function billing.consume_buckets(uuid, bigint) from public;

create function billing.draw_buckets(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_undrawn bigint;
begin
  with drawn as (
    select a.user_id, a.undrawn
    from billing.accounts as a
    where a.user_id = p_user_id
    -- The lock an update takes: `for update` would also wait for (and deadlock with) the key
    -- share lock a concurrent foreign-key check holds, e.g. a Stripe payment row being written.
    for no key update
  )

  update billing.accounts as a
  set undrawn = 0
  from drawn
  where a.user_id = drawn.user_id and drawn.undrawn > 0
  returning drawn.undrawn into v_undrawn;

  if v_undrawn > 0 then
    perform billing.consume_buckets(p_user_id, v_undrawn);
  end if;
end;
$$;

comment on function billing.draw_buckets(uuid) is
'Draws the account''s undrawn debits from its buckets (consumption order) and zeroes undrawn. '
'Locks the account; run before anything adds, expires or reads buckets.';

revoke all on function billing.draw_buckets(uuid) from public;

create function billing.credit(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_kind text,
  p_description text default null,
  p_expires_at timestamptz default null,
  p_metadata jsonb default '{}'
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
set search_path = ''
as $$
declare
  v_balance bigint;
  v_entry_id bigint;
begin
  perform billing.require_amount('p_amount', p_amount);
  perform billing.require_key('p_idempotency_key', p_idempotency_key);
  perform billing.require_object('p_metadata', p_metadata);

  -- Lock the account and credit it in one statement.
  update billing.accounts as a
  set balance = a.balance + p_amount, updated_at = now()
  where a.user_id = p_user_id
  returning a.balance into v_balance;

  if not found then
    return query select * from billing.replay_entry(
      p_idempotency_key, p_user_id, p_amount, p_kind, p_expires_at, true);
    if not found then
      return query select 'unknown_account'::text, null::bigint, null::bigint;
    end if;
    return;
  end if;

  insert into billing.ledger_entries (
    user_id, amount, balance_after, kind, idempotency_key, description, metadata
  )
  values (
    p_user_id, p_amount, v_balance, p_kind, p_idempotency_key, p_description,
    coalesce(p_metadata, '{}')
  )
  on conflict (idempotency_key) do nothing
  returning id into v_entry_id;

  if v_entry_id is null then
    -- The key was used before: take the credit back (nobody saw it, we hold the lock) and replay.
    update billing.accounts as a
    set balance = a.balance - p_amount
    where a.user_id = p_user_id;
    return query select * from billing.replay_entry(
      p_idempotency_key, p_user_id, p_amount, p_kind, p_expires_at, true);
    return;
  end if;

  -- Earlier debits come out of the earlier buckets, before this one exists.
  perform billing.draw_buckets(p_user_id);

  -- Debt is paid off first; the rest of the credit is what the bucket holds.
  insert into billing.credit_buckets (user_id, entry_id, amount, remaining, expires_at)
  values (
    p_user_id, v_entry_id,
    greatest(v_balance, 0) - greatest(v_balance - p_amount, 0),
    greatest(v_balance, 0) - greatest(v_balance - p_amount, 0),
    p_expires_at
  );

  return query select 'applied'::text, v_balance, v_entry_id;
end;
$$;

comment on function billing.credit(uuid, bigint, text, text, text, timestamptz, jsonb) is
'Credits an account: one ledger entry and one bucket, or the first result as duplicate. '
'Statuses: applied, duplicate, unknown_account. Callers validate kind and expiry.';

revoke all on function billing.credit(uuid, bigint, text, text, text, timestamptz, jsonb) from public;

create function billing.debit(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_kind text,
  p_description text default null,
  p_metadata jsonb default '{}',
  p_allow_debt boolean default false
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
set search_path = ''
as $$
begin
  -- The checks inline; the helpers (which word the error) only run when one fails.
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0
    or (p_metadata is not null and jsonb_typeof(p_metadata) <> 'object') then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_key('p_idempotency_key', p_idempotency_key);
    perform billing.require_object('p_metadata', p_metadata);
  end if;

  -- One statement: lock and debit the account (usage never takes available below zero), then
  -- write the entry, unless its key exists already. One row if the account was debited, with
  -- the entry's id unless the key was taken.
  with debited as (
    update billing.accounts as a
    set balance = a.balance - p_amount, undrawn = a.undrawn + p_amount, updated_at = now()
    where a.user_id = p_user_id
      and (p_allow_debt or a.balance - a.reserved >= p_amount)
    returning a.balance
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    select
      p_user_id, -p_amount, debited.balance, p_kind, p_idempotency_key, p_description,
      coalesce(p_metadata, '{}')
    from debited
    on conflict (idempotency_key) do nothing
    returning id
  )

  select debited.balance, entry.id
  into balance, entry_id
  from debited
  left join entry on true;

  if entry_id is not null then
    status := 'applied';
    return next;
    return;
  end if;

  if balance is not null then
    -- The key was used before: take the debit back (nobody saw it, we hold the lock).
    update billing.accounts as a
    set balance = a.balance + p_amount, undrawn = a.undrawn - p_amount
    where a.user_id = p_user_id;
  end if;

  return query select * from billing.replay_entry(
    p_idempotency_key, p_user_id, -p_amount, p_kind);
  if found then
    return;
  end if;
  return query
  select 'insufficient_funds'::text, a.balance, null::bigint
  from billing.accounts as a
  where a.user_id = p_user_id;
  if not found then
    return query select 'unknown_account'::text, null::bigint, null::bigint;
  end if;
end;
$$;

comment on function billing.debit(uuid, bigint, text, text, text, jsonb, boolean) is
'Debits an account in one statement: one ledger entry, the amount added to undrawn, or the '
'first result as duplicate. Without p_allow_debt, refuses to take available below zero '
'(insufficient_funds). Statuses: applied, duplicate, insufficient_funds, unknown_account.';

revoke all on function billing.debit(uuid, bigint, text, text, text, jsonb, boolean) from public;

-- The public RPCs -----------------------------------------------------------------------------

create function public.add_tokens(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_kind text default 'adjustment',
  p_description text default null,
  p_expires_at timestamptz default null,
  p_metadata jsonb default '{}'
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  if p_kind is null
    or p_kind not in ('purchase', 'subscription', 'promotion', 'adjustment', 'refund') then
    raise exception using
      errcode = '22023',
      message = format(
        'p_kind must be one of purchase, subscription, promotion, adjustment, refund, got %s',
        coalesce(quote_literal(p_kind), 'null'));
  end if;
  perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);
  if p_expires_at is not null and p_expires_at <= now() then
    raise exception using
      errcode = '22023',
      message = format('p_expires_at must be in the future, got %s', p_expires_at);
  end if;
  return query select * from billing.credit(
    p_user_id, p_amount, p_idempotency_key, p_kind, p_description, p_expires_at, p_metadata);
end;
$$;

comment on function public.add_tokens(uuid, bigint, text, text, text, timestamptz, jsonb) is
'Credits tokens into a new bucket (optional expiry). Statuses: applied, duplicate, '
'unknown_account. Raises 22023 on invalid arguments, TBKEY on a key reused differently.';

revoke all on function public.add_tokens(uuid, bigint, text, text, text, timestamptz, jsonb)
from public, anon, authenticated;
grant execute on function public.add_tokens(uuid, bigint, text, text, text, timestamptz, jsonb)
to service_role;

create function public.deduct_tokens(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_description text default null,
  p_metadata jsonb default '{}'
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  if p_idempotency_key ~ '^(signup|expiry|reservation|stripe):' then
    perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);
  end if;
  return query select * from billing.debit(
    p_user_id, p_amount, p_idempotency_key, 'usage', p_description, p_metadata, false);
end;
$$;

comment on function public.deduct_tokens(uuid, bigint, text, text, jsonb) is
'Charges usage, never taking available below zero. Statuses: applied, duplicate, '
'insufficient_funds, unknown_account. Raises 22023 on invalid arguments, TBKEY on reuse.';

revoke all on function public.deduct_tokens(uuid, bigint, text, text, jsonb)
from public, anon, authenticated;
grant execute on function public.deduct_tokens(uuid, bigint, text, text, jsonb)
to service_role;

insert into billing.schema_migrations (version, name) values ('20261121000400', 'ledger');
