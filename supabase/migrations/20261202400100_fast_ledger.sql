-- Migration: the deduct and credit paths as one plpgsql function each, one statement on the fast
-- path.
--
-- Purpose: deduct_tokens is the call agent backends make per model call. It used to be a shell
-- around billing.debit (a nested call and a second search_path switch per debit) whose helpers
-- ran even on good input. Now each function on the path checks its arguments inline (the
-- helpers that word the error run only when a check fails; the key-namespace rule is four
-- `like`s) and runs ONE statement: the account update with the funds predicate and the ledger
-- insert `on conflict do nothing`, in one data-modifying CTE (for a credit, with the bucket
-- insert too when nothing is undrawn). Anything but `applied` (a replayed key, no funds, no
-- account) takes the slow path in a helper.
-- Objects: billing.debit_refused(), billing.credit_refused(), billing.draw_undrawn(); redefines
--   public.deduct_tokens(), public.add_tokens(), billing.debit(), billing.credit(),
--   billing.check_invariants() (with the rules of 20261202100000_holds_and_expiry.sql and the
--   kind clawback_reversed of 20261202200000_stripe_sales.sql).
--
-- Lock order, unchanged: every function locks the account row first, with the statement that
-- changes it, then that user's buckets and reservations; several accounts in ascending user_id
-- order (deduct_tokens_batch, settle_reservations). A per-account advisory lock taken before
-- the row (so that waiters on a hot account queue in the lock manager instead of on the tuple)
-- was measured and not kept: bench/results/history.md.

-- Slow paths ----------------------------------------------------------------------------------

create function billing.debit_refused(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_kind text,
  p_debited boolean
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
set search_path = ''
as $$
begin
  if p_debited then
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

comment on function billing.debit_refused(uuid, bigint, text, text, boolean) is
'The answer of a debit that wrote no entry: undoes the debit when the account was debited but '
'the key existed, then duplicate (or TBKEY), insufficient_funds or unknown_account.';

revoke all on function billing.debit_refused(uuid, bigint, text, text, boolean) from public;

create function billing.credit_refused(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_kind text,
  p_expires_at timestamptz,
  p_undrawn bigint
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
set search_path = ''
as $$
begin
  if p_undrawn is not null then
    -- The key was used before: take the credit back and restore what was undrawn (nobody saw
    -- it, we hold the lock).
    update billing.accounts as a
    set balance = a.balance - p_amount, undrawn = p_undrawn
    where a.user_id = p_user_id;
  end if;

  return query select * from billing.replay_entry(
    p_idempotency_key, p_user_id, p_amount, p_kind, p_expires_at, true);
  if not found and p_undrawn is null then
    return query select 'unknown_account'::text, null::bigint, null::bigint;
  end if;
end;
$$;

comment on function billing.credit_refused(uuid, bigint, text, text, timestamptz, bigint) is
'The answer of a credit that wrote no entry: undoes the credit when the account was credited '
'but the key existed (p_undrawn: the undrawn it had), then duplicate (or TBKEY) or '
'unknown_account.';

revoke all on function billing.credit_refused(uuid, bigint, text, text, timestamptz, bigint)
from public;

-- Debits --------------------------------------------------------------------------------------

create or replace function public.deduct_tokens(
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
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0
    or p_idempotency_key like 'signup:%' or p_idempotency_key like 'expiry:%'
    or p_idempotency_key like 'reservation:%' or p_idempotency_key like 'stripe:%'
    or (p_metadata is not null and jsonb_typeof(p_metadata) <> 'object') then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);
    perform billing.require_object('p_metadata', p_metadata);
  end if;

  -- One statement: lock and debit the account (usage never takes available below zero), then
  -- write the entry unless its key exists already.
  with debited as (
    update billing.accounts as a
    set balance = a.balance - p_amount, undrawn = a.undrawn + p_amount, updated_at = now()
    where a.user_id = p_user_id and a.balance - a.reserved >= p_amount
    returning a.balance
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    select
      p_user_id, -p_amount, debited.balance, 'usage', p_idempotency_key, p_description,
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
  return query select * from billing.debit_refused(
    p_user_id, p_amount, p_idempotency_key, 'usage', balance is not null);
end;
$$;

create or replace function billing.debit(
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
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0
    or (p_metadata is not null and jsonb_typeof(p_metadata) <> 'object') then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_key('p_idempotency_key', p_idempotency_key);
    perform billing.require_object('p_metadata', p_metadata);
  end if;

  -- public.deduct_tokens's statement, with the kind and the debt rule of the caller.
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
  return query select * from billing.debit_refused(
    p_user_id, p_amount, p_idempotency_key, p_kind, balance is not null);
end;
$$;

-- Credits -------------------------------------------------------------------------------------

create function billing.draw_undrawn(p_user_id uuid, p_undrawn bigint) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_held_expired bigint;
  v_bucket_tokens bigint;
begin
  -- billing.draw_buckets after its first statement (20261202100000_holds_and_expiry.sql): the
  -- caller zeroed undrawn in its own statement, under the account's lock.
  select a.held_expired into v_held_expired
  from billing.accounts as a
  where a.user_id = p_user_id;
  if v_held_expired > 0 then
    -- Usage never takes held tokens (available excludes them); only a debit that may create
    -- debt can take more than the buckets hold, and then it took held tokens too.
    select coalesce(sum(b.remaining), 0)::bigint into v_bucket_tokens
    from billing.credit_buckets as b
    where b.user_id = p_user_id and b.remaining > 0;
    if p_undrawn > v_bucket_tokens then
      update billing.accounts as a
      set held_expired = a.held_expired - least(a.held_expired, p_undrawn - v_bucket_tokens)
      where a.user_id = p_user_id;
    end if;
  end if;
  perform billing.consume_buckets(p_user_id, p_undrawn);
end;
$$;

comment on function billing.draw_undrawn(uuid, bigint) is
'Draws p_undrawn tokens of debits from the account''s buckets (consumption order); what the '
'buckets cannot give comes out of held_expired. The caller locked the account and zeroed '
'undrawn (billing.credit, public.add_tokens).';

revoke all on function billing.draw_undrawn(uuid, bigint) from public;


create or replace function billing.credit(
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
  v_undrawn bigint;
begin
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0
    or (p_metadata is not null and jsonb_typeof(p_metadata) <> 'object') then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_key('p_idempotency_key', p_idempotency_key);
    perform billing.require_object('p_metadata', p_metadata);
  end if;

  -- One statement: lock the account, credit it and take its undrawn debits, write the entry
  -- unless its key exists, and, when nothing was undrawn, the entry's bucket. Debt is paid off
  -- first; the rest of the credit is what the bucket holds.
  with drawn as (
    select a.user_id, a.undrawn
    from billing.accounts as a
    where a.user_id = p_user_id
    -- The lock an update takes: `for update` would also wait for (and deadlock with) the key
    -- share lock a concurrent foreign-key check holds, e.g. a Stripe payment row being written.
    for no key update
  ),

  credited as (
    update billing.accounts as a
    set balance = a.balance + p_amount, undrawn = 0, updated_at = now()
    from drawn
    where a.user_id = drawn.user_id
    returning a.balance, drawn.undrawn
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    select
      p_user_id, p_amount, credited.balance, p_kind, p_idempotency_key, p_description,
      coalesce(p_metadata, '{}')
    from credited
    on conflict (idempotency_key) do nothing
    returning id
  ),

  bucket as (
    insert into billing.credit_buckets (user_id, entry_id, amount, remaining, expires_at)
    select
      p_user_id, entry.id,
      greatest(credited.balance, 0) - greatest(credited.balance - p_amount, 0),
      greatest(credited.balance, 0) - greatest(credited.balance - p_amount, 0),
      p_expires_at
    from entry
    cross join credited
    where credited.undrawn = 0
  )

  select credited.balance, credited.undrawn, entry.id
  into balance, v_undrawn, entry_id
  from credited
  left join entry on true;

  if entry_id is null then
    return query select * from billing.credit_refused(
      p_user_id, p_amount, p_idempotency_key, p_kind, p_expires_at, v_undrawn);
    return;
  end if;

  if v_undrawn > 0 then
    -- Earlier debits come out of the earlier buckets, before this one exists.
    perform billing.draw_undrawn(p_user_id, v_undrawn);
    insert into billing.credit_buckets (user_id, entry_id, amount, remaining, expires_at)
    values (
      p_user_id, entry_id,
      greatest(balance, 0) - greatest(balance - p_amount, 0),
      greatest(balance, 0) - greatest(balance - p_amount, 0),
      p_expires_at
    );
  end if;

  status := 'applied';
  return next;
end;
$$;

create or replace function public.add_tokens(
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
declare
  v_undrawn bigint;
begin
  if p_kind is null
    or p_kind not in ('purchase', 'subscription', 'promotion', 'adjustment', 'refund') then
    raise exception using
      errcode = '22023',
      message = format(
        'p_kind must be one of purchase, subscription, promotion, adjustment, refund, got %s',
        coalesce(quote_literal(p_kind), 'null'));
  end if;
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0
    or p_idempotency_key like 'signup:%' or p_idempotency_key like 'expiry:%'
    or p_idempotency_key like 'reservation:%' or p_idempotency_key like 'stripe:%'
    or (p_metadata is not null and jsonb_typeof(p_metadata) <> 'object') then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);
    perform billing.require_object('p_metadata', p_metadata);
  end if;
  if p_expires_at is not null and p_expires_at <= now() then
    raise exception using
      errcode = '22023',
      message = format('p_expires_at must be in the future, got %s', p_expires_at);
  end if;

  -- billing.credit's statement (one function call less on the public path).
  with drawn as (
    select a.user_id, a.undrawn
    from billing.accounts as a
    where a.user_id = p_user_id
    for no key update
  ),

  credited as (
    update billing.accounts as a
    set balance = a.balance + p_amount, undrawn = 0, updated_at = now()
    from drawn
    where a.user_id = drawn.user_id
    returning a.balance, drawn.undrawn
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    select
      p_user_id, p_amount, credited.balance, p_kind, p_idempotency_key, p_description,
      coalesce(p_metadata, '{}')
    from credited
    on conflict (idempotency_key) do nothing
    returning id
  ),

  bucket as (
    insert into billing.credit_buckets (user_id, entry_id, amount, remaining, expires_at)
    select
      p_user_id, entry.id,
      greatest(credited.balance, 0) - greatest(credited.balance - p_amount, 0),
      greatest(credited.balance, 0) - greatest(credited.balance - p_amount, 0),
      p_expires_at
    from entry
    cross join credited
    where credited.undrawn = 0
  )

  select credited.balance, credited.undrawn, entry.id
  into balance, v_undrawn, entry_id
  from credited
  left join entry on true;

  if entry_id is null then
    return query select * from billing.credit_refused(
      p_user_id, p_amount, p_idempotency_key, p_kind, p_expires_at, v_undrawn);
    return;
  end if;

  if v_undrawn > 0 then
    perform billing.draw_undrawn(p_user_id, v_undrawn);
    insert into billing.credit_buckets (user_id, entry_id, amount, remaining, expires_at)
    values (
      p_user_id, entry_id,
      greatest(balance, 0) - greatest(balance - p_amount, 0),
      greatest(balance, 0) - greatest(balance - p_amount, 0),
      p_expires_at
    );
  end if;

  status := 'applied';
  return next;
end;
$$;

-- Invariants: the released ones, and the per-writer rules the ledger's CHECK used to hold ------

create or replace function billing.check_invariants() returns table (
  user_id uuid, problem text, expected bigint, actual bigint
)
language sql stable
set search_path = ''
as $$
  with entry_totals as (
    select e.user_id, sum(e.amount)::bigint as total
    from billing.ledger_entries as e
    group by e.user_id
  ),

  pending_totals as (
    select r.user_id, sum(r.amount)::bigint as total
    from billing.reservations as r
    where r.status = 'pending'
    group by r.user_id
  ),

  bucket_totals as (
    select b.user_id, sum(b.remaining)::bigint as total
    from billing.credit_buckets as b
    group by b.user_id
  ),

  debt_users as (
    select distinct e.user_id
    from billing.ledger_entries as e
    where e.kind in ('clawback', 'dispute')
  ),

  chain as (
    select
      e.user_id,
      e.id,
      e.balance_after,
      sum(e.amount) over (partition by e.user_id order by e.id) as running
    from billing.ledger_entries as e
  )

  select a.user_id, 'balance = sum(ledger_entries.amount)', coalesce(t.total, 0), a.balance
  from billing.accounts as a
  left join entry_totals as t on a.user_id = t.user_id
  where a.balance <> coalesce(t.total, 0)
  union all
  select a.user_id, 'reserved = sum(pending reservations)', coalesce(p.total, 0), a.reserved
  from billing.accounts as a
  left join pending_totals as p on a.user_id = p.user_id
  where a.reserved <> coalesce(p.total, 0)
  union all
  select
    a.user_id,
    'greatest(sum(buckets.remaining) - undrawn + held_expired, 0) = greatest(balance, 0)',
    greatest(a.balance, 0), greatest(coalesce(b.total, 0) - a.undrawn + a.held_expired, 0)
  from billing.accounts as a
  left join bucket_totals as b on a.user_id = b.user_id
  where greatest(coalesce(b.total, 0) - a.undrawn + a.held_expired, 0) <> greatest(a.balance, 0)
  union all
  -- Holds keep their tokens: what is held never exceeds the tokens of unexpired buckets plus
  -- the held tokens whose bucket expired. Only debt (a clawback, a lost dispute) may break it.
  select
    a.user_id,
    'reserved <= sum(buckets.remaining) - undrawn + held_expired (holds keep their tokens)',
    coalesce(b.total, 0) - a.undrawn + a.held_expired, a.reserved
  from billing.accounts as a
  left join bucket_totals as b on a.user_id = b.user_id
  where a.reserved > coalesce(b.total, 0) - a.undrawn + a.held_expired
    and not exists (select 1 from debt_users as d where d.user_id = a.user_id)
  union all
  -- Also the accounts CHECK (accounts_row_valid); reported should it ever be dropped.
  select
    a.user_id, 'held_expired between 0 and reserved', a.reserved, a.held_expired
  from billing.accounts as a
  where a.held_expired < 0 or a.held_expired > a.reserved
  union all
  select
    e.user_id, format('entry %s (%s) left the balance below zero', e.id, e.kind), 0,
    e.balance_after
  from billing.ledger_entries as e
  where e.kind in ('usage', 'expiry') and e.balance_after < 0
  union all
  select e.user_id, format('entry %s without an account', e.id), null, null
  from billing.ledger_entries as e
  where not exists (select 1 from billing.accounts as a where a.user_id = e.user_id)
  union all
  select r.user_id, format('reservation %s without an account', r.id), null, null
  from billing.reservations as r
  where not exists (select 1 from billing.accounts as a where a.user_id = r.user_id)
  union all
  select c.user_id, format('entry %s: balance_after = running sum', c.id), c.running::bigint,
    c.balance_after
  from chain as c
  where c.balance_after <> c.running
  union all
  select
    e.user_id,
    format('entry %s: %s %s has the wrong sign, a key of %s characters or metadata of type %s',
      e.id, e.kind, e.amount, length(e.idempotency_key), jsonb_typeof(e.metadata)),
    null, null
  from billing.ledger_entries as e
  where (e.amount < 0) <> (e.kind in ('usage', 'expiry', 'clawback', 'dispute'))
    or length(e.idempotency_key) not between 1 and 255
    or jsonb_typeof(e.metadata) is distinct from 'object'
  union all
  -- The writers' rules (20261202400000_plain_checks.sql): the sign of each kind, a key of
  -- 1..255 characters, metadata an object, known kinds, and keys in
  -- token-billing's own namespaces only on the entries they describe.
  select e.user_id, format('entry %s: kind %s is not a known kind', e.id, e.kind), null, null
  from billing.ledger_entries as e
  where e.kind not in (
    'purchase', 'subscription', 'promotion', 'adjustment', 'refund', 'signup', 'dispute_won',
    'clawback_reversed', 'usage', 'expiry', 'clawback', 'dispute'
  )
  union all
  select
    e.user_id,
    format('entry %s: key %s is in token-billing''s namespace but not its entry', e.id,
      e.idempotency_key),
    null, null
  from billing.ledger_entries as e
  where (e.idempotency_key like 'signup:%' and e.kind <> 'signup')
    or (e.idempotency_key like 'expiry:%' and e.kind <> 'expiry')
    or (
      e.idempotency_key like 'reservation:%'
      and e.idempotency_key is distinct from 'reservation:' || e.reservation_id::text
    )
    or (
      e.idempotency_key like 'stripe:%'
      and not (
        e.kind in (
          'purchase', 'subscription', 'clawback', 'dispute', 'dispute_won', 'clawback_reversed'
        )
        and e.metadata ? 'stripe_event_id'
      )
    )
$$;

comment on function billing.check_invariants() is
'One row per broken invariant (none when the books are sound): balances equal entry sums, '
'reserved equals pending reservations, buckets plus held_expired hold the positive balance, '
'holds never exceed the tokens that back them (except in debt), held_expired is within '
'0..reserved, usage and expiry never leave a balance below zero, balance_after chains, '
'entries have the sign of their kind, a key of 1..255 characters, object metadata, known kinds '
'and keys of token-billing''s namespaces only on their own entries.';

revoke all on function billing.check_invariants() from public;

insert into billing.schema_migrations (version, name) values ('20261202400100', 'fast_ledger');
