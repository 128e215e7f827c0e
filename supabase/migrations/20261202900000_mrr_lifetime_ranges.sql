-- Migration: mrr_report reads the subscriptions alive in the report's months through one index
-- bounding both ends of a lifetime.
--
-- Purpose: 20261202650400 selected lifetimes by first_at <= the last edge (a btree on first_at),
-- then filtered zero_since > the first edge: over a long history every old, long-canceled
-- subscription passes the first test, so a month's report read every subscription ever begun
-- (the bench's 10^7 database: 100,000 lifetimes read, 723 kept; 2.98x the 10^5 database's time).
-- A lifetime is now the range [first_at, zero_since) (unbounded while it is worth something)
-- under a GiST index, and the report asks for the ranges overlapping [first edge, last edge]:
-- the index reads the subscriptions alive in those months, not the history. The rows are the
-- same as before: an empty range (worth 0 from its first state) is worth 0 at every edge.
-- Objects: index subscription_lifetimes_alive_idx (replaces the first_at and zero_since btrees),
--   redefines public.mrr_report() (the same figures).

create index subscription_lifetimes_alive_idx on billing.subscription_lifetimes
using gist (tstzrange(first_at, zero_since, '[)'));

drop index billing.subscription_lifetimes_first_at_idx;
drop index billing.subscription_lifetimes_zero_since_idx;

create or replace function public.mrr_report(
  p_from timestamptz,
  p_to timestamptz,
  p_currency text default null
)
returns table (
  month_start timestamptz,
  currency text,
  mrr_start_cents bigint,
  mrr_end_cents bigint,
  new_cents bigint,
  expansion_cents bigint,
  contraction_cents bigint,
  churned_cents bigint,
  subscribers_start bigint,
  subscribers_end bigint,
  new_subscribers bigint,
  churned_subscribers bigint,
  churn_rate_bp bigint,
  arpu_cents bigint,
  ltv_cents bigint
)
language plpgsql stable
security invoker
-- Reports plan row counts they cannot know (a period, a history): JIT would compile for
-- seconds to save milliseconds.
set jit = off
set search_path = ''
as $$
declare
  v_first_edge timestamptz;
  v_last_edge timestamptz;
begin
  if p_from is null or p_to is null or p_to <= p_from then
    raise exception 'p_to must be later than p_from, got % .. %',
      coalesce(p_from::text, 'null'), coalesce(p_to::text, 'null')
      using errcode = '22023';
  end if;
  if p_to - p_from > interval '10 years' then
    raise exception 'a report spans at most 10 years, got %', p_to - p_from
      using errcode = '22023';
  end if;

  v_first_edge := date_trunc('month', p_from at time zone 'UTC') at time zone 'UTC';
  v_last_edge := (date_trunc('month', (p_to at time zone 'UTC') - interval '1 microsecond')
    + interval '1 month') at time zone 'UTC';

  return query
  with months as (
    -- Calendar months of UTC, whatever the session's time zone.
    select
      m at time zone 'UTC' as t0,
      (m + interval '1 month') at time zone 'UTC' as t1
    from generate_series(
      date_trunc('month', p_from at time zone 'UTC'),
      (p_to at time zone 'UTC') - interval '1 microsecond',
      interval '1 month'
    ) as m
  ),

  -- Each state lasts until the next one of its subscription; same-second states order by how
  -- final the status is, then by event id.
  states as (
    select
      st.*,
      coalesce(c.user_id::text, st.stripe_customer_id, st.subscription_id) as payer,
      lead(st.at) over (
        partition by st.subscription_id order by st.at, st.status_rank, st.event_id
      ) as until
    -- Only subscriptions that may be worth something at an edge of the months: alive at some
    -- time between the first edge and the last (billing.subscription_lifetimes).
    from billing.subscription_lifetimes as l
    cross join lateral (
      -- Each one's states by its index; `offset 0` keeps the planner from hashing the whole
      -- table instead (the bench's 10^7 database: a parallel scan of every state ever stored).
      select s.*
      from billing.subscription_states as s
      where s.subscription_id = l.subscription_id
      offset 0
    ) as st
    left join billing.customers as c on c.stripe_customer_id = st.stripe_customer_id
    -- Lifetime [first_at, zero_since) overlapping [first edge, last edge]: first_at <= the last
    -- edge and zero_since (null: never) > the first, read by the GiST index on that range.
    where tstzrange(l.first_at, l.zero_since, '[)')
      && tstzrange(v_first_edge, v_last_edge, '[]')
      and (p_currency is null or st.currency = lower(p_currency))
  ),

  -- What each payer (a user, or the customer when no user is linked) pays a month at the
  -- month's start and end, per currency: their subscriptions sum.
  worth as (
    select mo.t0, x.edge, st.payer, st.currency, sum(st.mrr_cents) as cents
    from months as mo
    cross join lateral (values (mo.t0, 'start'), (mo.t1, 'end')) as x (at, edge)
    inner join states as st
      on st.at <= x.at and (st.until is null or st.until > x.at)
    group by mo.t0, x.edge, st.payer, st.currency
  ),

  moves as (
    select
      coalesce(s.t0, e.t0) as t0,
      coalesce(s.currency, e.currency) as currency,
      coalesce(s.cents, 0) as a,
      coalesce(e.cents, 0) as b
    from (select * from worth where edge = 'start') as s
    full join (select * from worth where edge = 'end') as e
      on e.t0 = s.t0 and e.payer = s.payer and e.currency = s.currency
  ),

  totals as (
    select
      mv.t0,
      mv.currency,
      sum(mv.a)::bigint as mrr_start,
      sum(mv.b)::bigint as mrr_end,
      sum(case when mv.a = 0 and mv.b > 0 then mv.b else 0 end)::bigint as new_c,
      sum(case when mv.a > 0 and mv.b > mv.a then mv.b - mv.a else 0 end)::bigint as expansion,
      sum(case when mv.b > 0 and mv.b < mv.a then mv.a - mv.b else 0 end)::bigint as contraction,
      sum(case when mv.a > 0 and mv.b = 0 then mv.a else 0 end)::bigint as churned,
      count(*) filter (where mv.a > 0) as subs_start,
      count(*) filter (where mv.b > 0) as subs_end,
      count(*) filter (where mv.a = 0 and mv.b > 0) as subs_new,
      count(*) filter (where mv.a > 0 and mv.b = 0) as subs_churned
    from moves as mv
    group by mv.t0, mv.currency
  )

  select
    t.t0,
    t.currency,
    t.mrr_start,
    t.mrr_end,
    t.new_c,
    t.expansion,
    t.contraction,
    t.churned,
    t.subs_start,
    t.subs_end,
    t.subs_new,
    t.subs_churned,
    case when t.subs_start > 0 then round(10000.0 * t.subs_churned / t.subs_start)::bigint end,
    case when t.subs_end > 0 then round(t.mrr_end::numeric / t.subs_end)::bigint end,
    -- ARPU / churn rate = (end MRR / end subscribers) / (churned / start subscribers): one
    -- division of integers, so the half-up rounding is exact.
    case
      when t.subs_start > 0 and t.subs_churned > 0 and t.subs_end > 0
        then round(
          (t.mrr_end::numeric * t.subs_start) / (t.subs_end * t.subs_churned)
        )::bigint
    end
  from totals as t
  where t.mrr_start > 0 or t.mrr_end > 0
  order by t.t0, t.currency;
end;
$$;


insert into billing.schema_migrations (version, name) values ('20261202900000', 'mrr_lifetime_ranges');
