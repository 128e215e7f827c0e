-- Migration: the business figures the service exports as Prometheus metrics, cheaply.
--
-- Purpose: GET /metrics shows active subscribers by plan, revenue by currency, tokens granted,
-- used and expired, parked events, failed invoice payments and open alerts. The service asks
-- public.business_metrics() at most once every METRICS_BUSINESS_SECONDS (60 by default) and
-- serves the cached answer in between; the call itself never scans the ledger's history: the
-- ledger's totals per kind are maintained in billing.ledger_totals, each call adding only the
-- entries created since the last one (a BRIN range of billing.ledger_entries.created_at). The
-- other figures read small tables (subscriptions, payments, refunds, disputes, alerts) or
-- partial indexes (parked events, failed invoice payments).
-- Objects: billing.ledger_totals, billing.metric_state, public.business_metrics().
--
-- The ledger's totals lag: they count entries created before now() - p_lag (default 10
-- minutes), so that an entry of a transaction still open when the totals advanced (created_at is
-- its transaction's start) is not skipped; an entry of a transaction open longer than the lag
-- would be. The first call counts the whole history once.

create table billing.ledger_totals (
  kind text primary key,
  entries bigint not null default 0,
  credited bigint not null default 0,
  debited bigint not null default 0,
  constraint ledger_totals_not_negative check (entries >= 0 and credited >= 0 and debited >= 0)
);

comment on table billing.ledger_totals is
'Per ledger kind: entries, tokens credited (positive amounts) and debited (negative amounts, as '
'a positive number), of the entries created before billing.metric_state.ledger_through. '
'Advanced only by public.business_metrics().';
comment on column billing.ledger_totals.kind is 'The ledger kind.';
comment on column billing.ledger_totals.entries is 'Entries of the kind counted.';
comment on column billing.ledger_totals.credited is 'Sum of their positive amounts.';
comment on column billing.ledger_totals.debited is 'Minus the sum of their negative amounts.';

alter table billing.ledger_totals enable row level security;
-- No policy: service role only.
revoke all on billing.ledger_totals from public, anon, authenticated, service_role;
grant select on billing.ledger_totals to service_role;

create table billing.metric_state (
  id boolean primary key default true,
  ledger_through timestamptz not null default '-infinity',
  refreshed_at timestamptz,
  constraint metric_state_one_row check (id)
);

comment on table billing.metric_state is
'One row: how far billing.ledger_totals counts (entries created before ledger_through) and when '
'it last advanced. Its row lock serializes concurrent refreshes.';
comment on column billing.metric_state.id is 'Always true: the table has exactly one row.';
comment on column billing.metric_state.ledger_through is 'ledger_totals counts entries created before this.';
comment on column billing.metric_state.refreshed_at is 'When ledger_totals last advanced.';

alter table billing.metric_state enable row level security;
-- No policy: service role only.
revoke all on billing.metric_state from public, anon, authenticated, service_role;
grant select on billing.metric_state to service_role;

insert into billing.metric_state (id) values (true) on conflict (id) do nothing;

create function public.business_metrics(p_lag interval default '10 minutes')
returns table (metric text, labels jsonb, value bigint)
language plpgsql
-- Definer: it advances billing.ledger_totals, which service_role only reads.
security definer
set jit = off
set search_path = ''
as $$
declare
  v_through timestamptz;
  v_to timestamptz;
begin
  if p_lag is null or p_lag < interval '0' or p_lag > interval '1 day' then
    raise exception 'p_lag must be between 0 and 1 day, got %', coalesce(p_lag::text, 'null')
      using errcode = '22023';
  end if;
  select s.ledger_through into v_through from billing.metric_state as s for update;
  v_to := now() - p_lag;
  if v_to > v_through then
    insert into billing.ledger_totals as t (kind, entries, credited, debited)
    select
      e.kind, count(*),
      coalesce(sum(e.amount) filter (where e.amount > 0), 0),
      coalesce(-sum(e.amount) filter (where e.amount < 0), 0)
    from billing.ledger_entries as e
    where e.created_at >= v_through and e.created_at < v_to
    group by e.kind
    on conflict (kind) do update
    set entries = t.entries + excluded.entries, credited = t.credited + excluded.credited,
      debited = t.debited + excluded.debited;
    update billing.metric_state set ledger_through = v_to, refreshed_at = now();
    v_through := v_to;
  end if;

  return query
  select 'token_billing_subscribers', jsonb_build_object('plan', s.product_code, 'status', s.status),
    count(*)
  from billing.subscriptions as s
  where s.status in ('active', 'trialing', 'past_due')
  group by s.product_code, s.status
  union all
  select 'token_billing_revenue_cents_total', jsonb_build_object('currency', r.cur), sum(r.cents)::bigint
  from (
    select lower(coalesce(p.currency, 'usd')) as cur, p.amount_paid_cents as cents
    from billing.stripe_payments as p
    union all
    select lower(coalesce(p.currency, 'usd')), -r.amount_cents
    from billing.stripe_refunds as r
    inner join billing.stripe_payments as p on p.id = r.payment_id
    where r.status is distinct from 'failed' and r.status is distinct from 'canceled'
    union all
    select lower(coalesce(p.currency, 'usd')), -d.amount_cents
    from billing.stripe_disputes as d
    inner join billing.stripe_payments as p on p.id = d.payment_id
    where d.status = 'lost'
  ) as r
  group by r.cur
  union all
  select 'token_billing_tokens_granted_total', jsonb_build_object('kind', t.kind), t.credited
  from billing.ledger_totals as t
  where t.credited > 0
  union all
  select 'token_billing_tokens_used_total', '{}'::jsonb, coalesce((
    select t.debited from billing.ledger_totals as t where t.kind = 'usage'), 0)
  union all
  select 'token_billing_tokens_expired_total', '{}'::jsonb, coalesce((
    select t.debited from billing.ledger_totals as t where t.kind = 'expiry'), 0)
  union all
  select 'token_billing_tokens_taken_back_total', jsonb_build_object('kind', t.kind), t.debited
  from billing.ledger_totals as t
  where t.debited > 0 and t.kind not in ('usage', 'expiry')
  union all
  select 'token_billing_ledger_totals_through_timestamp_seconds', '{}'::jsonb,
    greatest(extract(epoch from v_through), 0)::bigint
  union all
  select 'token_billing_stripe_events_parked', '{}'::jsonb, count(*)
  from billing.stripe_events as e
  where e.status = 'parked'
  union all
  select 'token_billing_invoice_payment_failures_total', '{}'::jsonb, count(*)
  from billing.stripe_events as e
  where e.type = 'invoice.payment_failed'
  union all
  select 'token_billing_alerts', jsonb_build_object('kind', a.kind), count(*)
  from billing.alerts as a
  group by a.kind;
end;
$$;

comment on function public.business_metrics(interval) is
'The business figures of GET /metrics, one row per metric and label set: active subscribers by '
'plan and status, net revenue by currency (minor units, all time), tokens granted by kind, used, '
'expired and taken back by kind (billing.ledger_totals, advanced to now() - p_lag first), the '
'time the ledger totals count up to, parked events, failed invoice payments and alerts by kind. '
'Service role only; the service caches the answer.';

revoke all on function public.business_metrics(interval) from public, anon, authenticated;
grant execute on function public.business_metrics(interval) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202650300', 'business_metrics');
