-- Migration: margin (revenue attributed less the provider's cost) per user, plan and period, and
-- the alert when a plan's margin falls under a floor.
--
-- Purpose: the guide's cost-per-user formula as a query. usage_records carry the provider's
-- cost of each item (20261202650000_usage_costs.sql); Stripe's payments carry what users paid.
-- margin_report puts them side by side for any period, per user, per plan or in total, and
-- check_margin_floor writes an alert (billing.alerts, which the dashboard shows) for each plan
-- whose margin in a period is under billing.settings.margin_floor_bp.
-- Objects: columns billing.settings.cost_currency, margin_floor_bp; billing.alerts;
--   public.margin_report(), public.check_margin_floor(), public.list_alerts().
--
-- The attribution rule, stated (cash basis, exact integers, no division but the last):
--   revenue of a user in a period = what the user paid in it, net: payments at their paid_at,
--     less refunds (unless failed or canceled) at their own Stripe time and lost disputes when
--     lost, in the payment's currency: revenue_report's rule, per user. A pack bought in March
--     and used in April is March's revenue and April's cost; over the months the sums agree.
--   cost of a user in a period = the sum of usage_records.cost_microcents of the user's usage
--     recorded in it (unknown costs count 0 and are counted in uncosted_records).
--   the plan of a user in a period = the plan of the user's last usage record of the period
--     (the account's plan when it was recorded), else the account's plan now; the user's revenue
--     and cost of that period both count for it.
--   currencies are never mixed: costs are in micro-cents of the cost currency
--     (billing.settings.cost_currency, default usd); a user's cost counts in the currency of
--     the user's latest payment before the period's end (the cost currency when there is none),
--     and margin is computed only where that currency is the cost currency (null elsewhere:
--     token-billing does not convert currencies).
--   margin_microcents = revenue_cents x 10^6 - cost_microcents; margin_bp = margin / revenue x
--     10000, rounded half away from zero; null without revenue.

alter table billing.settings
add column cost_currency text not null default 'usd',
add column margin_floor_bp integer,
add constraint settings_cost_currency_format check (cost_currency ~ '^[a-z]{3}$'),
add constraint settings_margin_floor_bp_range check (margin_floor_bp between -1000000 and 10000);

comment on column billing.settings.cost_currency is
'The currency of the provider costs on prices and usage records (micro-cents of it), ISO code.';
comment on column billing.settings.margin_floor_bp is
'The least margin a plan should make in a period, in basis points of its revenue (2000: 20%); '
'check_margin_floor alerts under it. Null: no margin alert.';

create table billing.alerts (
  id bigint generated always as identity primary key,
  kind text not null,
  subject text not null,
  period_start timestamptz not null,
  currency text not null,
  detail jsonb not null default '{}',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint alerts_kind_known check (kind in ('margin_below_floor')),
  constraint alerts_once unique (kind, subject, period_start, currency)
);

create index alerts_created_at_idx on billing.alerts (created_at desc);

comment on table billing.alerts is
'Alerts for the operator (the dashboard lists them): one row per kind, subject, period and '
'currency, raised again only by updating its detail. Written by check_margin_floor.';
comment on column billing.alerts.id is 'Alert id.';
comment on column billing.alerts.kind is 'margin_below_floor: a plan''s margin under billing.settings.margin_floor_bp.';
comment on column billing.alerts.subject is 'What it is about (for margin_below_floor, the plan).';
comment on column billing.alerts.period_start is 'The period it is about (its first instant).';
comment on column billing.alerts.currency is 'The currency of its figures.';
comment on column billing.alerts.detail is 'Its figures, e.g. revenue_cents, cost_microcents, margin_bp, floor_bp.';
comment on column billing.alerts.created_at is 'When it was first raised.';
comment on column billing.alerts.updated_at is 'When a check last found it (its detail is that check''s).';

alter table billing.alerts enable row level security;
-- No policy: service role only.
revoke all on billing.alerts from public, anon, authenticated, service_role;
grant select on billing.alerts to service_role;

create function public.margin_report(
  p_from timestamptz,
  p_to timestamptz,
  p_granularity text default 'month',
  p_group_by text default 'plan',
  p_currency text default null
)
returns table (
  period_start timestamptz,
  currency text,
  plan text,
  user_id uuid,
  users bigint,
  revenue_cents bigint,
  cost_currency text,
  cost_microcents bigint,
  uncosted_records bigint,
  tokens_used bigint,
  margin_microcents bigint,
  margin_bp bigint
)
language plpgsql stable
security invoker
-- Reports plan row counts they cannot know (a period, a history): JIT would compile for
-- seconds to save milliseconds.
set jit = off
set search_path = ''
as $$
declare
  v_cost_currency text;
begin
  if p_granularity is null or p_granularity not in ('day', 'week', 'month') then
    raise exception 'p_granularity must be day, week or month, got %',
      coalesce(quote_literal(p_granularity), 'null')
      using errcode = '22023';
  end if;
  if p_group_by is null or p_group_by not in ('user', 'plan', 'total') then
    raise exception 'p_group_by must be user, plan or total, got %',
      coalesce(quote_literal(p_group_by), 'null')
      using errcode = '22023';
  end if;
  if p_from is null or p_to is null or p_to <= p_from then
    raise exception 'p_to must be later than p_from, got % .. %',
      coalesce(p_from::text, 'null'), coalesce(p_to::text, 'null')
      using errcode = '22023';
  end if;
  if p_to - p_from > interval '10 years' then
    raise exception 'a report spans at most 10 years, got %', p_to - p_from
      using errcode = '22023';
  end if;
  select s.cost_currency into v_cost_currency from billing.settings as s;
  v_cost_currency := coalesce(v_cost_currency, 'usd');

  return query
  with money as (
    -- What each user paid and was given back, at Stripe's time (revenue_report's rules).
    select p.user_id as uid, p.paid_at as at, coalesce(lower(p.currency), v_cost_currency) as cur,
      p.amount_paid_cents as cents
    from billing.stripe_payments as p
    where p.paid_at >= p_from and p.paid_at < p_to
    union all
    select p.user_id, coalesce(r.refund_created, r.created_at),
      coalesce(lower(p.currency), v_cost_currency), -r.amount_cents
    from billing.stripe_refunds as r
    inner join billing.stripe_payments as p on p.id = r.payment_id
    where coalesce(r.refund_created, r.created_at) >= p_from
      and coalesce(r.refund_created, r.created_at) < p_to
      and r.status is distinct from 'failed'
      and r.status is distinct from 'canceled'
    union all
    select p.user_id, d.last_event_created, coalesce(lower(p.currency), v_cost_currency),
      -d.amount_cents
    from billing.stripe_disputes as d
    inner join billing.stripe_payments as p on p.id = d.payment_id
    where d.status = 'lost'
      and d.last_event_created >= p_from and d.last_event_created < p_to
  ),

  revenue as (
    select date_trunc(p_granularity, m.at, 'UTC') as t0, m.uid, m.cur, sum(m.cents) as cents
    from money as m
    group by 1, 2, 3
  ),

  usage as (
    select
      date_trunc(p_granularity, r.created_at, 'UTC') as t0,
      r.user_id as uid,
      sum(coalesce(r.cost_microcents, 0)) as cost,
      count(*) filter (where r.cost_microcents is null) as uncosted,
      sum(r.tokens) as tokens,
      (array_agg(r.plan order by r.id desc) filter (where r.plan is not null))[1] as last_plan
    from billing.usage_records as r
    where r.created_at >= p_from and r.created_at < p_to
    group by 1, 2
  ),

  used as (
    -- A user's cost counts in the currency of the user's latest payment before the period's end.
    select u.*, coalesce((
      select coalesce(lower(p.currency), v_cost_currency)
      from billing.stripe_payments as p
      where p.user_id = u.uid
        and p.paid_at < u.t0 + case p_granularity
          when 'day' then interval '1 day' when 'week' then interval '1 week'
          else interval '1 month' end
      order by p.paid_at desc, p.id desc
      limit 1
    ), v_cost_currency) as cur
    from usage as u
  ),

  per_user as (
    select
      coalesce(rv.t0, us.t0) as t0,
      coalesce(rv.cur, us.cur) as cur,
      coalesce(rv.uid, us.uid) as uid,
      coalesce(rv.cents, 0) as cents,
      coalesce(us.cost, 0) as cost,
      coalesce(us.uncosted, 0) as uncosted,
      coalesce(us.tokens, 0) as tokens
    from revenue as rv
    full join used as us on us.t0 = rv.t0 and us.uid = rv.uid and us.cur = rv.cur
  ),

  planned as (
    select pu.*, coalesce(
      (select us.last_plan from usage as us where us.t0 = pu.t0 and us.uid = pu.uid),
      a.plan
    ) as user_plan
    from per_user as pu
    left join billing.accounts as a on a.user_id = pu.uid
    where p_currency is null or pu.cur = lower(p_currency)
  ),

  grouped as (
    select
      pl.t0,
      pl.cur,
      case when p_group_by <> 'total' then pl.user_plan end as g_plan,
      case when p_group_by = 'user' then pl.uid end as g_user,
      count(distinct pl.uid) as n_users,
      sum(pl.cents) as cents,
      sum(pl.cost) as cost,
      sum(pl.uncosted) as uncosted,
      sum(pl.tokens) as tokens
    from planned as pl
    group by 1, 2, 3, 4
  )

  select
    g.t0,
    g.cur,
    g.g_plan,
    g.g_user,
    g.n_users,
    g.cents::bigint,
    v_cost_currency,
    g.cost::bigint,
    g.uncosted::bigint,
    g.tokens::bigint,
    case when g.cur = v_cost_currency then (g.cents * 1000000 - g.cost)::bigint end,
    case when g.cur = v_cost_currency and g.cents > 0
      then round((g.cents * 1000000 - g.cost) * 10000 / (g.cents * 1000000.0))::bigint
    end
  from grouped as g
  order by g.t0, g.cur, g.g_plan nulls first, g.g_user nulls first;
end;
$$;

comment on function public.margin_report(timestamptz, timestamptz, text, text, text) is
'Revenue attributed and provider cost in [p_from, p_to) by period (day, week or month, UTC), '
'currency and p_group_by (user, plan or total): users, net revenue in minor units, cost in '
'micro-cents of cost_currency (uncosted_records: records without a cost), tokens used, margin '
'(revenue x 10^6 - cost; null unless the currency is the cost currency) and margin_bp (margin / '
'revenue in basis points, half away from zero). Cash basis; the rule is stated in '
'20261202650100_margin.sql. Service role only.';

revoke all on function public.margin_report(timestamptz, timestamptz, text, text, text)
from public, anon, authenticated;
grant execute on function public.margin_report(timestamptz, timestamptz, text, text, text)
to service_role;

create function public.check_margin_floor(
  p_period_start timestamptz,
  p_granularity text default 'month'
)
returns table (
  plan text,
  currency text,
  revenue_cents bigint,
  cost_microcents bigint,
  margin_bp bigint,
  floor_bp integer,
  alert_id bigint
)
language plpgsql
-- Definer: it writes billing.alerts, which service_role only reads.
security definer
set jit = off
set search_path = ''
as $$
declare
  v_floor integer;
  v_cost_currency text;
  v_start timestamptz;
begin
  if p_granularity is null or p_granularity not in ('day', 'week', 'month') then
    raise exception 'p_granularity must be day, week or month, got %',
      coalesce(quote_literal(p_granularity), 'null')
      using errcode = '22023';
  end if;
  if p_period_start is null then
    raise exception 'p_period_start must be a time in the period to check' using errcode = '22023';
  end if;
  select s.margin_floor_bp, s.cost_currency into v_floor, v_cost_currency from billing.settings as s;
  if v_floor is null then
    return;
  end if;
  v_start := date_trunc(p_granularity, p_period_start, 'UTC');

  -- Plans with revenue in the period whose margin is under the floor (a plan without revenue,
  -- the free plan say, has no margin to fall).
  return query
  with breaches as (
    select m.plan, m.currency, m.revenue_cents, m.cost_microcents, m.margin_bp
    from public.margin_report(
      v_start,
      v_start + case p_granularity
        when 'day' then interval '1 day' when 'week' then interval '1 week'
        else interval '1 month' end,
      p_granularity, 'plan', v_cost_currency
    ) as m
    where m.revenue_cents > 0 and m.margin_bp < v_floor
  ),

  raised as (
    insert into billing.alerts as al (kind, subject, period_start, currency, detail)
    select
      'margin_below_floor', coalesce(b.plan, '(none)'), v_start, b.currency,
      jsonb_build_object(
        'granularity', p_granularity, 'revenue_cents', b.revenue_cents,
        'cost_microcents', b.cost_microcents, 'margin_bp', b.margin_bp, 'floor_bp', v_floor
      )
    from breaches as b
    on conflict on constraint alerts_once
    do update set detail = excluded.detail, updated_at = now()
    returning al.id, al.subject
  )

  select b.plan, b.currency, b.revenue_cents, b.cost_microcents, b.margin_bp, v_floor, r.id
  from breaches as b
  inner join raised as r on r.subject = coalesce(b.plan, '(none)')
  order by b.margin_bp, b.plan;
end;
$$;

comment on function public.check_margin_floor(timestamptz, text) is
'The plans whose margin in the period (day, week or month, UTC) containing p_period_start is '
'under billing.settings.margin_floor_bp, in the cost currency, among plans with revenue; each is '
'raised (or refreshed) as a margin_below_floor row of billing.alerts. No rows when no floor is '
'set. Service role only; run it from cron (token-billing report margin --check-floor).';

revoke all on function public.check_margin_floor(timestamptz, text) from public, anon, authenticated;
grant execute on function public.check_margin_floor(timestamptz, text) to service_role;

create function public.list_alerts(p_limit integer default 20)
returns table (
  id bigint,
  kind text,
  subject text,
  period_start timestamptz,
  currency text,
  detail jsonb,
  created_at timestamptz,
  updated_at timestamptz
)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_limit is null or p_limit not between 1 and 1000 then
    raise exception 'p_limit must be 1..1000, got %', coalesce(p_limit::text, 'null')
      using errcode = '22023';
  end if;
  return query
  select a.id, a.kind, a.subject, a.period_start, a.currency, a.detail, a.created_at, a.updated_at
  from billing.alerts as a
  order by a.created_at desc, a.id desc
  limit p_limit;
end;
$$;

comment on function public.list_alerts(integer) is
'The newest p_limit (1..1000) alerts of billing.alerts, newest first. Service role only.';

revoke all on function public.list_alerts(integer) from public, anon, authenticated;
grant execute on function public.list_alerts(integer) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202650100', 'margin');
