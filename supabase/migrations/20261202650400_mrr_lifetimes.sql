-- Migration: MRR for a month costs what that month's subscriptions cost, not the history's.
--
-- Purpose: mrr_report (20261202600200_mrr.sql) ordered every state of every subscription ever
-- stored to find which state holds at each month's edges: a month's MRR cost grew with the
-- history (the bench's 10^7-entry database has 100 times the 10^5 one's subscriptions). Now
-- billing.subscription_lifetimes keeps, per subscription, when its first state is and its latest
-- state (so since when it is worth 0 for good: canceled, unpaid, paused...), and the
-- report reads only the states of subscriptions begun by the last edge and not worth 0 since
-- before the first: the same rows, exactly (a subscription worth 0 at every edge adds nothing to
-- any figure), read through two indexes.
-- Objects: billing.subscription_lifetimes (+ trigger tg_subscription_states__lifetime),
--   redefines public.mrr_report() (the same figures).

create table billing.subscription_lifetimes (
  subscription_id text primary key,
  first_at timestamptz not null,
  last_at timestamptz not null,
  last_rank smallint not null,
  last_event_id text not null,
  last_mrr_cents bigint not null,
  zero_since timestamptz
);

create index subscription_lifetimes_first_at_idx on billing.subscription_lifetimes (first_at);
create index subscription_lifetimes_zero_since_idx on billing.subscription_lifetimes (zero_since);

comment on table billing.subscription_lifetimes is
'Per subscription of billing.subscription_states: its first state''s time and its latest state '
'(by at, status rank, event id, the order mrr_report reads them in); kept by a trigger on '
'billing.subscription_states under this row''s lock, so it is what those states say whatever '
'order they are stored in.';
comment on column billing.subscription_lifetimes.subscription_id is 'The subscription (sub_...).';
comment on column billing.subscription_lifetimes.first_at is 'Stripe''s time of its first state.';
comment on column billing.subscription_lifetimes.last_at is 'The time of its latest state.';
comment on column billing.subscription_lifetimes.last_rank is 'The status rank of its latest state.';
comment on column billing.subscription_lifetimes.last_event_id is 'The event of its latest state.';
comment on column billing.subscription_lifetimes.last_mrr_cents is 'The MRR of its latest state.';
comment on column billing.subscription_lifetimes.zero_since is
'last_at when the latest state is worth 0 (so is the subscription from then on); else null.';

alter table billing.subscription_lifetimes enable row level security;
-- No policy: service role only.
revoke all on billing.subscription_lifetimes from public, anon, authenticated, service_role;
grant select on billing.subscription_lifetimes to service_role;

create function billing.tg_subscription_states__lifetime() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  -- The upsert waits on (and then reads) the row a concurrent state of the same subscription
  -- wrote: the latest state wins whatever the order of storage.
  insert into billing.subscription_lifetimes as l (
    subscription_id, first_at, last_at, last_rank, last_event_id, last_mrr_cents, zero_since
  )
  values (
    new.subscription_id, new.at, new.at, new.status_rank, new.event_id, new.mrr_cents,
    case when new.mrr_cents = 0 then new.at end
  )
  on conflict (subscription_id) do update
  set
    first_at = least(l.first_at, excluded.first_at),
    last_at = case when (excluded.last_at, excluded.last_rank, excluded.last_event_id)
      > (l.last_at, l.last_rank, l.last_event_id) then excluded.last_at else l.last_at end,
    last_rank = case when (excluded.last_at, excluded.last_rank, excluded.last_event_id)
      > (l.last_at, l.last_rank, l.last_event_id) then excluded.last_rank else l.last_rank end,
    last_event_id = case when (excluded.last_at, excluded.last_rank, excluded.last_event_id)
      > (l.last_at, l.last_rank, l.last_event_id) then excluded.last_event_id
      else l.last_event_id end,
    last_mrr_cents = case when (excluded.last_at, excluded.last_rank, excluded.last_event_id)
      > (l.last_at, l.last_rank, l.last_event_id) then excluded.last_mrr_cents
      else l.last_mrr_cents end,
    zero_since = case when (excluded.last_at, excluded.last_rank, excluded.last_event_id)
      > (l.last_at, l.last_rank, l.last_event_id) then excluded.zero_since
      else l.zero_since end;
  return null;
end;
$$;

comment on function billing.tg_subscription_states__lifetime() is
'After a subscription state is stored: its subscription''s first time and latest state.';

revoke all on function billing.tg_subscription_states__lifetime() from public;

create trigger tg_subscription_states__lifetime
after insert on billing.subscription_states
for each row execute function billing.tg_subscription_states__lifetime();

-- The subscriptions stored before this migration.
insert into billing.subscription_lifetimes (
  subscription_id, first_at, last_at, last_rank, last_event_id, last_mrr_cents, zero_since
)
select distinct on (st.subscription_id)
  st.subscription_id,
  min(st.at) over (partition by st.subscription_id) as first_at,
  st.at,
  st.status_rank,
  st.event_id,
  st.mrr_cents,
  case when st.mrr_cents = 0 then st.at end as zero_since
from billing.subscription_states as st
order by st.subscription_id asc, st.at desc, st.status_rank desc, st.event_id desc;

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
    -- Only subscriptions that may be worth something at an edge of the months: begun by the
    -- last edge, and not worth 0 for good since before the first (billing.subscription_lifetimes).
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
    where l.first_at <= v_last_edge
      and (l.zero_since is null or l.zero_since > v_first_edge)
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


insert into billing.schema_migrations (version, name) values ('20261202650400', 'mrr_lifetimes');
