-- Migration: what `token-billing stripe reconcile` asks the database.
--
-- Purpose: a webhook that never arrived (an endpoint misconfigured, a deployment down for longer
-- than Stripe retries) leaves no trace here. The reconcile command lists Stripe's events and its
-- paid Checkout Sessions and invoices, asks which events were never stored, feeds those to
-- public.handle_stripe_event exactly as the webhook would, and then asks which paid objects still
-- have no credit (or one that disagrees with what Stripe says was paid).
-- Objects: public.stripe_events_unknown(jsonb), public.stripe_credit_drift(jsonb).

create function public.stripe_events_unknown(p_event_ids jsonb)
returns table (event_id text)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_event_ids is null or jsonb_typeof(p_event_ids) <> 'array' then
    raise exception 'p_event_ids must be a json array of Stripe event ids'
      using errcode = '22023';
  end if;
  if jsonb_array_length(p_event_ids) > 10000 then
    raise exception 'p_event_ids holds % ids; at most 10000 per call',
      jsonb_array_length(p_event_ids)
      using errcode = '22023';
  end if;
  return query
  select distinct i.id
  from jsonb_array_elements_text(p_event_ids) as i (id)
  where not exists (select from billing.stripe_events as e where e.id = i.id)
  order by i.id;
end;
$$;

comment on function public.stripe_events_unknown(jsonb) is
'The ids among p_event_ids (at most 10,000) that billing.stripe_events has never stored: the '
'events a reconcile run must still feed to handle_stripe_event. Service role only.';

revoke all on function public.stripe_events_unknown(jsonb) from public, anon, authenticated;
grant execute on function public.stripe_events_unknown(jsonb) to service_role;

-- A paid object is expected to have credited when it is one of ours: a Checkout Session or
-- PaymentIntent the service recorded (billing.stripe_sales), a payment-mode session whose
-- metadata names a pack of the catalog, or an invoice with a line whose price is a plan's
-- stripe_price_id. A PaymentIntent is credited under its own id or under the session it paid.
-- Anything else a Stripe account sells is not this plugin's and is never reported. Amounts
-- compare in the object's minor units and currency, as Stripe sends them.
create function public.stripe_credit_drift(p_objects jsonb)
returns table (
  object_id text,
  object_type text,
  problem text,
  paid_cents bigint,
  currency text,
  credited_cents bigint,
  credited_currency text,
  detail text
)
language plpgsql stable
security definer
set search_path = ''
as $$
begin
  if p_objects is null or jsonb_typeof(p_objects) <> 'array' then
    raise exception 'p_objects must be a json array of Stripe Checkout Sessions, PaymentIntents and invoices'
      using errcode = '22023';
  end if;
  if jsonb_array_length(p_objects) > 10000 then
    raise exception 'p_objects holds % objects; at most 10000 per call',
      jsonb_array_length(p_objects)
      using errcode = '22023';
  end if;

  return query
  with objects as (
    select
      o.value ->> 'id' as id,
      o.value ->> 'object' as type,
      case o.value ->> 'object'
        when 'checkout.session' then (o.value ->> 'amount_total')::bigint
        when 'payment_intent' then (o.value ->> 'amount_received')::bigint
        else (o.value ->> 'amount_paid')::bigint
      end as paid,
      lower(o.value ->> 'currency') as currency,
      case o.value ->> 'object'
        when 'checkout.session' then
          o.value ->> 'mode' = 'payment'
          and o.value ->> 'payment_status' = 'paid'
          and (
            exists (select from billing.stripe_sales as s where s.id = o.value ->> 'id')
            or exists (
              select from billing.products as p
              where p.code = o.value #>> '{metadata,product}' and p.kind = 'pack'
            )
          )
        when 'payment_intent' then
          o.value ->> 'status' = 'succeeded'
          and exists (select from billing.stripe_sales as s where s.id = o.value ->> 'id')
        when 'invoice' then
          o.value ->> 'status' = 'paid'
          and (o.value ->> 'amount_paid')::bigint > 0
          and exists (
            select
            from jsonb_array_elements(coalesce(o.value #> '{lines,data}', '[]')) as l (line)
            inner join billing.products as p
              on p.stripe_price_id = billing.invoice_line_price(l.line) and p.kind = 'plan'
          )
        else false
      end as ours
    from jsonb_array_elements(p_objects) as o (value)
  )

  select
    o.id,
    o.type,
    case
      when sp.id is null then 'not_credited'
      when sp.currency is distinct from o.currency then 'currency_differs'
      else 'amount_differs'
    end,
    o.paid,
    o.currency,
    sp.amount_paid_cents,
    sp.currency,
    case
      when sp.id is null then coalesce(
        (
          select format('its event %s is %s: %s', e.id, e.status, e.detail)
          from billing.stripe_events as e
          where e.payload #>> '{data,object,id}' = o.id
            and e.status = 'parked'
          order by e.created desc
          limit 1
        ),
        'no stored event credited it'
      )
      else format('stored payment %s credited %s tokens', sp.id, sp.tokens)
    end
  from objects as o
  left join lateral (
    select p.*
    from billing.stripe_payments as p
    where p.id = o.id or (o.type = 'payment_intent' and p.stripe_payment_intent_id = o.id)
    order by p.id = o.id desc
    limit 1
  ) as sp on true
  where o.ours
    and (
      sp.id is null
      or sp.currency is distinct from o.currency
      or sp.amount_paid_cents <> o.paid
    )
  order by o.type, o.id;
end;
$$;

comment on function public.stripe_credit_drift(jsonb) is
'Of p_objects (Stripe Checkout Sessions, PaymentIntents and invoices as the API returns them, at '
'most 10,000), those of this plugin (a session or payment intent the service recorded, a session '
'for a catalog pack, an invoice with a plan''s price) that are '
'paid but have no credit, or a credit whose amount or currency differs from what was paid: '
'problem not_credited, amount_differs or currency_differs, with the parked event that explains '
'it when there is one (parked events only: they are few and indexed). Service role only.';

revoke all on function public.stripe_credit_drift(jsonb) from public, anon, authenticated;
grant execute on function public.stripe_credit_drift(jsonb) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202600000', 'stripe_reconcile');
