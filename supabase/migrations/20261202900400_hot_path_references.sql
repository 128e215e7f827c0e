-- Migration: credit buckets and creator earnings without foreign keys on the spend path.
--
-- Purpose: a foreign key runs a referential query for every row inserted, at the end of the
-- statement. Two tables on the spend path had them:
--   * billing.credit_buckets (entry_id, user_id): every credit (add_tokens, billing.credit)
--     inserts a bucket. bench.ab --script add_tokens with and without the keys, 8 clients,
--     fsync off, 6 interleaved rounds of 3 s: 1.147x without (1.068-1.195).
--   * billing.creator_earnings (creator_id): every spend naming a listing accrues a share, and
--     the key's check locks the creator's row FOR KEY SHARE, so concurrent spends on one
--     creator's agents share that lock (a multixact on the creator row). --script
--     deduct_listing (10,000 buyers, one creator): 1.124x without (0.989-1.200).
-- The other hot tables already work this way (ledger_entries.user_id, reservations,
-- usage_records: no foreign keys, the writers' rule and check_invariants()). The writers insert
-- from rows they just wrote or read: a bucket from the entry of the same statement, under the
-- account's lock; a share from the listing's billing.products.creator_id (itself a foreign key
-- to billing.creators), a reversal or payout from the creator's own entries or row. Entries are
-- append-only; accounts and creators are never deleted. check_invariants() now reports a bucket
-- that is not on a credit entry of its own user (a stronger rule than the two keys, which did
-- not tie the two together) and an earnings entry of no creator.
-- Objects: drops constraints credit_buckets_entry_id_fkey, credit_buckets_user_id_fkey and
--   creator_earnings_creator_id_fkey; redefines billing.check_invariants().

alter table billing.credit_buckets
drop constraint credit_buckets_entry_id_fkey,
drop constraint credit_buckets_user_id_fkey;

alter table billing.creator_earnings
drop constraint creator_earnings_creator_id_fkey;

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
      -- A throttle or postpaid plan's overage (billing.debit_overage).
      or (e.kind = 'usage' and e.metadata ? 'overage')
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
    -- A throttle or postpaid plan's overage (billing.debit_overage) may end below zero.
    and not (e.kind = 'usage' and e.metadata ? 'overage')
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
  union all
  -- A bucket holds the tokens of one credit entry of its own account (the writers insert it
  -- from the entry they just wrote; no foreign key checks it on the way in).
  select
    b.user_id, format('bucket %s: entry %s is not a ledger entry of its user', b.id, b.entry_id),
    null, null
  from billing.credit_buckets as b
  where not exists (
    select 1 from billing.ledger_entries as e
    where e.id = b.entry_id and e.user_id = b.user_id and e.amount > 0
  )
  union all
  select
    c.creator_id, format('creator earnings entry %s: %s is not a creator', c.id, c.creator_id),
    null, null
  from billing.creator_earnings as c
  where not exists (select 1 from billing.creators as r where r.user_id = c.creator_id)
$$;

comment on function billing.check_invariants() is
'One row per broken invariant (none when the books are sound): balances equal entry sums, '
'reserved equals pending reservations, buckets plus held_expired hold the positive balance, '
'holds never exceed the tokens that back them (except in debt: a clawback, a lost dispute, an '
'adjustment allowed below zero or a plan''s overage), held_expired is within 0..reserved, '
'usage (but a throttle or postpaid plan''s overage) and expiry never leave a balance below '
'zero, balance_after chains, entries have the sign of their kind (adjustments either), a key '
'of 1..255 characters, object metadata, known kinds and keys of token-billing''s namespaces '
'only on their own entries; every credit bucket belongs to a credit entry of its own user and '
'every creator earnings entry to a creator.';

insert into billing.schema_migrations (version, name) values ('20261202900400', 'hot_path_references');
