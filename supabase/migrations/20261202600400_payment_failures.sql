-- Migration: the failed-payment rate.
--
-- Purpose: of the invoices Stripe tried to collect in a period, how many failed at least once
-- (invoice.payment_failed), and how many of those were paid in the end. An invoice counts in the
-- period of its first attempt in the window (its first failure or its payment, at Stripe's
-- time); retries of one invoice count once. Read through a partial index of the invoice events.
-- Objects: public.payment_failure_report(), index stripe_events_invoice_outcomes_idx.

create index stripe_events_invoice_outcomes_idx on billing.stripe_events (created)
where type = 'invoice.payment_failed';

create function public.payment_failure_report(
  p_from timestamptz,
  p_to timestamptz,
  p_granularity text default 'month'
)
returns table (
  period_start timestamptz,
  invoices bigint,
  failed bigint,
  recovered bigint,
  failure_rate_bp bigint
)
language plpgsql stable
security invoker
-- Reports plan row counts they cannot know (a period, a history): JIT would compile for
-- seconds to save milliseconds.
set jit = off
set search_path = ''
as $$
begin
  if p_granularity is null or p_granularity not in ('day', 'week', 'month') then
    raise exception 'p_granularity must be day, week or month, got %',
      coalesce(quote_literal(p_granularity), 'null')
      using errcode = '22023';
  end if;
  if p_from is null or p_to is null or p_to <= p_from then
    raise exception 'p_to must be later than p_from, got % .. %',
      coalesce(p_from::text, 'null'), coalesce(p_to::text, 'null')
      using errcode = '22023';
  end if;

  return query
  with attempts as (
    select e.payload #>> '{data,object,id}' as invoice_id, e.created as at, true as failure
    from billing.stripe_events as e
    where e.type = 'invoice.payment_failed'
      and e.created >= p_from and e.created < p_to
      and e.status <> 'ignored'

    union all

    select p.id, p.paid_at, false
    from billing.stripe_payments as p
    where p.source = 'invoice' and p.paid_at >= p_from and p.paid_at < p_to
  ),

  invoices as (
    select
      a.invoice_id,
      min(a.at) as first_at,
      bool_or(a.failure) as failed,
      bool_or(not a.failure) as paid
    from attempts as a
    where a.invoice_id is not null
    group by a.invoice_id
  )

  select
    date_trunc(p_granularity, i.first_at, 'UTC'),
    count(*),
    count(*) filter (where i.failed),
    count(*) filter (where i.failed and i.paid),
    round(10000.0 * count(*) filter (where i.failed) / count(*))::bigint
  from invoices as i
  group by 1
  order by 1;
end;
$$;

comment on function public.payment_failure_report(timestamptz, timestamptz, text) is
'Invoices Stripe tried to collect in [p_from, p_to), by the period (day, week, month, UTC) of '
'their first attempt in it: how many, how many failed at least once, how many of those were '
'paid after all, and the failure rate in basis points (rounded half up). Service role only.';

revoke all on function public.payment_failure_report(timestamptz, timestamptz, text)
from public, anon, authenticated;
grant execute on function public.payment_failure_report(timestamptz, timestamptz, text)
to service_role;

insert into billing.schema_migrations (version, name) values ('20261202600400', 'payment_failures');
