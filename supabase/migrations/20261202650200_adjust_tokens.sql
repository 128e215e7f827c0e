-- Migration: an operator's adjustment of a balance, with a reason, once per key.
--
-- Purpose: `token-billing adjust <user> <+-amount> --reason "..."` corrects a balance (a
-- goodwill credit, a charge the service missed, a test grant taken back) as one `adjustment`
-- ledger entry that says who did it and why, and that a repeated command never applies twice.
-- A credit lands in a never-expiring bucket as add_tokens' do; a debit draws like usage and never
-- takes available below zero, unless the operator allows debt (p_allow_debt): then the balance
-- may go below zero, the hold rule of billing.check_invariants is waived for that account as it
-- is after a clawback, and usage is refused until a credit brings it back.
-- An adjustment may have either sign: the sign rule of the ledger (the writers', reported by
-- billing.check_invariants since the CHECK holds only amount <> 0) exempts it.
-- Objects: public.adjust_tokens(); redefines billing.check_invariants() (an adjustment of
--   either sign; one that left the balance below zero is debt, as a clawback or a lost dispute
--   is).

create function public.adjust_tokens(
  p_user_id uuid,
  p_amount bigint,
  p_reason text,
  p_idempotency_key text,
  p_allow_debt boolean default false,
  p_operator text default null
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_metadata jsonb;
begin
  if p_amount is null or p_amount = 0 or abs(p_amount) > 1000000000000000 then
    raise exception using
      errcode = '22023',
      message = format('p_amount must be a non-zero integer within +-10^15 tokens, got %s',
        coalesce(p_amount::text, 'null'));
  end if;
  if p_reason is null or length(btrim(p_reason)) not between 3 and 500 then
    raise exception using
      errcode = '22023',
      message = 'p_reason must say why, in 3 to 500 characters';
  end if;
  if p_operator is not null and length(p_operator) > 200 then
    raise exception using errcode = '22023', message = 'p_operator must be at most 200 characters';
  end if;
  if p_allow_debt is null then
    raise exception using errcode = '22023', message = 'p_allow_debt must be true or false';
  end if;
  perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);

  v_metadata := jsonb_build_object('reason', btrim(p_reason), 'operator', p_operator);
  if p_amount > 0 then
    return query select * from billing.credit(
      p_user_id, p_amount, p_idempotency_key, 'adjustment', btrim(p_reason), null, v_metadata);
  else
    return query select * from billing.debit(
      p_user_id, -p_amount, p_idempotency_key, 'adjustment', btrim(p_reason),
      v_metadata || jsonb_build_object('allow_debt', p_allow_debt), p_allow_debt);
  end if;
end;
$$;

comment on function public.adjust_tokens(uuid, bigint, text, text, boolean, text) is
'An operator''s adjustment: p_amount tokens (positive: a credit into a never-expiring bucket; '
'negative: a debit, never below available unless p_allow_debt) as one adjustment ledger entry '
'whose description is the reason and whose metadata holds reason and operator. Statuses applied, '
'duplicate (same key and amount), insufficient_funds, unknown_account; TBKEY for a key used '
'otherwise; 22023 for a zero amount, a missing reason or key.';

revoke all on function public.adjust_tokens(uuid, bigint, text, text, boolean, text)
from public, anon, authenticated;
grant execute on function public.adjust_tokens(uuid, bigint, text, text, boolean, text)
to service_role;

-- The invariants of 20261202400100_fast_ledger.sql, with debt from an adjustment.
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
      -- An operator's adjustment allowed into debt (public.adjust_tokens, p_allow_debt).
      or (e.kind = 'adjustment' and e.amount < 0 and e.balance_after < 0)
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
  where (
    e.kind <> 'adjustment'
    and (e.amount < 0) <> (e.kind in ('usage', 'expiry', 'clawback', 'dispute'))
  )
    or length(e.idempotency_key) not between 1 and 255
    or jsonb_typeof(e.metadata) is distinct from 'object'
  union all
  -- The writers' rules (20261202400000_plain_checks.sql): the sign of each kind (adjustments
  -- either), a key of 1..255 characters, metadata an object, known kinds, and keys in
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
'holds never exceed the tokens that back them (except in debt: a clawback, a lost dispute or an '
'adjustment allowed below zero), held_expired is within '
'0..reserved, usage and expiry never leave a balance below zero, balance_after chains, '
'entries have known kinds and keys of token-billing''s namespaces only on their own entries.';

revoke all on function billing.check_invariants() from public;

insert into billing.schema_migrations (version, name) values ('20261202650200', 'adjust_tokens');
