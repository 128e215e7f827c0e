-- Migration: what was earned, by period and by product.
--
-- Purpose: `token-billing report revenue` and the dashboard answer "what did we earn last month"
-- from what the Stripe handler already keeps, once per payment whichever events carried it:
-- billing.stripe_payments (paid, at Stripe's time of the event that credited it: paid_at),
-- billing.stripe_refunds (each refund at its own Stripe time, counted unless it failed or was
-- canceled) and billing.stripe_disputes (a lost dispute, at the time it was lost). Exact integers
-- in the currency's minor unit; currencies never mixed. Stripe's fees are not known here and are
-- not subtracted: net is what customers paid less what was given back.
-- Objects: public.revenue_report(), public.revenue_by_product(), indexes on the three tables.

create index stripe_payments_paid_at_idx on billing.stripe_payments (paid_at);
create index stripe_refunds_refund_created_idx on billing.stripe_refunds (
  coalesce(refund_created, created_at)
);
create index stripe_disputes_lost_idx on billing.stripe_disputes (last_event_created)
where status = 'lost';

create function public.revenue_report(
  p_from timestamptz,
  p_to timestamptz,
  p_granularity text default 'month',
  p_currency text default null
)
returns table (
  period_start timestamptz,
  currency text,
  payments bigint,
  gross_cents bigint,
  packs_cents bigint,
  plans_cents bigint,
  refunds bigint,
  refunded_cents bigint,
  disputes_lost bigint,
  disputed_cents bigint,
  net_cents bigint
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
  with moves as (
    select
      p.paid_at as at,
      lower(p.currency) as cur,
      1 as n_payment,
      p.amount_paid_cents as paid,
      case when pr.kind = 'pack' then p.amount_paid_cents else 0 end as pack,
      case when pr.kind = 'plan' then p.amount_paid_cents else 0 end as plan,
      0 as n_refund,
      0::bigint as refunded,
      0 as n_dispute,
      0::bigint as disputed
    from billing.stripe_payments as p
    left join billing.products as pr on pr.code = p.product_code
    where p.paid_at >= p_from and p.paid_at < p_to

    union all

    select
      coalesce(r.refund_created, r.created_at), lower(p.currency), 0, 0, 0, 0, 1,
      r.amount_cents, 0, 0
    from billing.stripe_refunds as r
    inner join billing.stripe_payments as p on p.id = r.payment_id
    where coalesce(r.refund_created, r.created_at) >= p_from
      and coalesce(r.refund_created, r.created_at) < p_to
      and r.status is distinct from 'failed'
      and r.status is distinct from 'canceled'

    union all

    select d.last_event_created, lower(p.currency), 0, 0, 0, 0, 0, 0, 1, d.amount_cents
    from billing.stripe_disputes as d
    inner join billing.stripe_payments as p on p.id = d.payment_id
    where d.status = 'lost'
      and d.last_event_created >= p_from and d.last_event_created < p_to
  )

  select
    date_trunc(p_granularity, m.at, 'UTC'),
    m.cur,
    sum(m.n_payment)::bigint,
    sum(m.paid)::bigint,
    sum(m.pack)::bigint,
    sum(m.plan)::bigint,
    sum(m.n_refund)::bigint,
    sum(m.refunded)::bigint,
    sum(m.n_dispute)::bigint,
    sum(m.disputed)::bigint,
    (sum(m.paid) - sum(m.refunded) - sum(m.disputed))::bigint
  from moves as m
  where p_currency is null or m.cur = lower(p_currency)
  group by 1, 2
  order by 1, 2;
end;
$$;

comment on function public.revenue_report(timestamptz, timestamptz, text, text) is
'Revenue in [p_from, p_to) by period (day, week or month, UTC) and currency (or only '
'p_currency): payments and what they paid (of it packs and plans), refunds (unless failed or '
'canceled, at their own Stripe time) and lost disputes (when lost), and net = paid - refunded - '
'lost, in minor units. Stripe''s fees are not subtracted. Service role only.';

revoke all on function public.revenue_report(timestamptz, timestamptz, text, text)
from public, anon, authenticated;
grant execute on function public.revenue_report(timestamptz, timestamptz, text, text)
to service_role;

create function public.revenue_by_product(
  p_from timestamptz,
  p_to timestamptz,
  p_currency text default null
)
returns table (
  product_code text,
  kind text,
  currency text,
  payments bigint,
  quantity bigint,
  tokens bigint,
  gross_cents bigint,
  refunded_cents bigint,
  net_cents bigint
)
language plpgsql stable
security invoker
set jit = off
set search_path = ''
as $$
begin
  if p_from is null or p_to is null or p_to <= p_from then
    raise exception 'p_to must be later than p_from, got % .. %',
      coalesce(p_from::text, 'null'), coalesce(p_to::text, 'null')
      using errcode = '22023';
  end if;
  -- Payments of the period, and what of them was given back (whenever it was): what each
  -- product sold in the period earned.
  return query
  select
    p.product_code,
    pr.kind,
    lower(p.currency),
    count(*),
    sum(p.quantity)::bigint,
    sum(p.tokens)::bigint,
    sum(p.amount_paid_cents)::bigint,
    sum(coalesce(back.cents, 0))::bigint,
    (sum(p.amount_paid_cents) - sum(coalesce(back.cents, 0)))::bigint
  from billing.stripe_payments as p
  left join billing.products as pr on pr.code = p.product_code
  left join lateral (
    select
      coalesce((
        select sum(r.amount_cents)
        from billing.stripe_refunds as r
        where r.payment_id = p.id
          and r.status is distinct from 'failed'
          and r.status is distinct from 'canceled'
      ), 0)
      + coalesce((
        select sum(d.amount_cents)
        from billing.stripe_disputes as d
        where d.payment_id = p.id and d.status = 'lost'
      ), 0) as cents
  ) as back on true
  where p.paid_at >= p_from and p.paid_at < p_to
    and (p_currency is null or lower(p.currency) = lower(p_currency))
  group by p.product_code, pr.kind, lower(p.currency)
  order by 7 desc, 1;
end;
$$;

comment on function public.revenue_by_product(timestamptz, timestamptz, text) is
'What each product sold in [p_from, p_to) earned, per currency: payments, quantity, tokens, '
'gross, what was refunded or lost in disputes of those payments (whenever), and net, in minor '
'units, largest gross first. Service role only.';

revoke all on function public.revenue_by_product(timestamptz, timestamptz, text)
from public, anon, authenticated;
grant execute on function public.revenue_by_product(timestamptz, timestamptz, text)
to service_role;

insert into billing.schema_migrations (version, name) values ('20261202600300', 'revenue');
