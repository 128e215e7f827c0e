-- Bench fixtures: the same users in the floor's tables, the seed guide's, its lean rewrite's and
-- ours.
--
-- User n (an integer in the pgbench scripts) is the uuid lpad(to_hex(n), 32, '0')::uuid in all
-- four, so every script pays the same for turning :uid into a uuid.
--   1..10000      the spread workloads (deduct over 2,000 = 1..2000 or 10,000 accounts,
--                 reserve + settle);
--   10001         the hot account;
--   20001..30000  add_tokens targets, kept apart so the buckets add_tokens leaves behind never
--                 lengthen the bucket walk of the deduct workloads;
--   40001..50000  on a plan with thresholds (20% and 0) and auto top-up (issue 17): the deduct
--                 that crosses none of them, against the deduct of 1..10000.
-- Every funded account holds 10^9 tokens in one bucket (the hot one 10^12 in ours; the guides'
-- integer columns cap them at 2*10^9): no deduct in the bench can run dry. Run as superuser.

insert into bench_floor.accounts (user_id, balance)
select lpad(to_hex(n), 32, '0')::uuid, 1000000000
from generate_series(1, 10001) as n;

insert into seed_guide.users (id, token_balance)
select lpad(to_hex(n), 32, '0')::uuid, 2000000000
from generate_series(1, 10001) as n;

insert into seed_guide_lean.profiles (id, tokens)
select lpad(to_hex(n), 32, '0')::uuid, 2000000000
from generate_series(1, 10001) as n;

-- Ours: users sign up (the auth.users trigger opens their accounts), then buy tokens.
insert into auth.users (id, email, aud, role)
select lpad(to_hex(n), 32, '0')::uuid, 'bench' || n || '@example.com', 'authenticated',
  'authenticated'
from generate_series(1, 10001) as n
union all
select lpad(to_hex(n), 32, '0')::uuid, 'bench' || n || '@example.com', 'authenticated',
  'authenticated'
from generate_series(20001, 30000) as n;

select count(*) from (
  select public.add_tokens(
    lpad(to_hex(n), 32, '0')::uuid,
    case when n = 10001 then 1000000000000 else 1000000000 end,
    'bench-fund-' || n,
    'purchase'
  )
  from generate_series(1, 10001) as n
) as funded;

-- Issue 17: a plan with alert thresholds and auto top-up (levels 200,000,000 and 0 of its
-- 10^9 tokens a period), and 10,000 users on it, funded like the others: no deduct crosses.
-- Only where the migrations have overage strategies (bench.ab loads these fixtures into an
-- older ref's schema too).
do $issue17$
begin
  if not exists (
    select 1 from information_schema.columns
    where table_schema = 'billing' and table_name = 'products' and column_name = 'overage_strategy'
  ) then
    return;
  end if;
  insert into billing.products (code, kind, name, tokens, price_cents)
  values ('bench_pack', 'pack', 'Bench pack', 1000, 100);
  execute $sql$
    insert into billing.products (
      code, kind, name, tokens, price_cents, overage_strategy, alert_thresholds, auto_top_up_pack,
      auto_top_up_below
    )
    values ('bench_topup', 'plan', 'Bench top-up plan', 1000000000, 100, 'auto_top_up', '{20, 0}',
      'bench_pack', 20)
  $sql$;
  insert into auth.users (id, email, aud, role)
  select lpad(to_hex(n), 32, '0')::uuid, 'bench' || n || '@example.com', 'authenticated',
    'authenticated'
  from generate_series(40001, 50000) as n;
  update billing.accounts set plan = 'bench_topup', subscription_status = 'active'
  where user_id between lpad(to_hex(40001), 32, '0')::uuid and lpad(to_hex(50000), 32, '0')::uuid;
  perform public.add_tokens(lpad(to_hex(n), 32, '0')::uuid, 1000000000, 'bench-fund-' || n, 'purchase')
  from generate_series(40001, 50000) as n;
end
$issue17$;

-- The references' ledgers get the same one purchase per user that ours has, so every table
-- starts with rows, its planner statistics say so, and every lookup is an index lookup as it
-- would be in a live database (on an empty table a cached plan may scan it instead).
insert into seed_guide.token_transactions (user_id, amount, type, description, event_id)
select lpad(to_hex(n), 32, '0')::uuid, 2000000000, 'purchase', 'bench fund', 'bench-fund-' || n
from generate_series(1, 10001) as n;

insert into seed_guide_lean.token_transactions (user_id, amount, type, event_id)
select lpad(to_hex(n), 32, '0')::uuid, 2000000000, 'purchase', 'bench-fund-' || n
from generate_series(1, 10001) as n;

insert into bench_floor.ledger (user_id, amount, balance_after)
select lpad(to_hex(n), 32, '0')::uuid, 1000000000, 1000000000
from generate_series(1, 10001) as n;

-- Rate cards (issue 16): a per-unit meter at 1 token a unit (what a deduct of 1 charges) and a
-- graduated one with 4 tiers, for record_usage against deduct_tokens.
insert into billing.meters (code, unit) values ('bench.unit', 'unit'), ('bench.tiered', 'unit');
insert into billing.prices (meter_code, scheme, unit_amount, effective_from)
values ('bench.unit', 'per_unit', 1, '2020-01-01');
insert into billing.prices (meter_code, scheme, tiers, effective_from)
values (
  'bench.tiered', 'graduated',
  '[{"up_to": 10, "unit_amount": 4}, {"up_to": 100, "unit_amount": 3},
    {"up_to": 1000, "unit_amount": 2}, {"up_to": null, "unit_amount": 1}]',
  '2020-01-01'
);

-- A usage history of the previous period (100,000 records over the 10,000 users), so the
-- planner has statistics for usage_records as in any deployment past its first minutes (an
-- empty, never analyzed table gets sequential scans that the growing table then pays for).
insert into billing.usage_records (
  user_id, idempotency_key, line, meter_code, quantity, dimension_value, price_id, tokens, created_at
)
select
  lpad(to_hex(n % 10000 + 1), 32, '0')::uuid, 'bench-history-' || n, 1, 'bench.tiered', 1, '',
  p.id, 1, now() - interval '40 days'
from generate_series(1, 100000) as n
cross join (select id from billing.prices where meter_code = 'bench.tiered') as p;

-- The marketplace (issue 19): a creator (user 50001, charges enabled) with an agent listing, so
-- a deduct whose metadata names it accrues the creator's share (billing.creator_earnings) in
-- the deduct's transaction; against deduct.sql, which names none.
insert into auth.users (id, email, aud, role)
values (lpad(to_hex(50001), 32, '0')::uuid, 'bench-creator@example.com', 'authenticated', 'authenticated');
insert into billing.creators (user_id, stripe_account_id, charges_enabled, payouts_enabled)
values (lpad(to_hex(50001), 32, '0')::uuid, 'acct_bench', true, true);
select * from public.upsert_listing(
  lpad(to_hex(50001), 32, '0')::uuid, 'bench_agent', 'Bench agent', null, 1
);

vacuum analyze;
