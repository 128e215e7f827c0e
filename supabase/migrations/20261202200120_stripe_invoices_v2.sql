-- Migration: Stripe invoice events across plan changes, trials and both invoice shapes.
--
-- Purpose: a paid subscription invoice grants the plan of its non-proration line for that line's
-- period, whatever else it lists (Stripe lists pending proration items first) and whatever became
-- of the subscription after it was paid. Mid-period changes, keyed on the invoice so they apply
-- once: an upgrade invoiced at once (billing_reason subscription_update) grants the new plan's
-- tokens less the old plan's, scaled by the unused part of the period, expiring at the period
-- end; a downgrade grants nothing and takes effect at the next period; proration lines of a
-- later cycle invoice grant nothing (their period is over). A trial's $0 first invoice grants
-- the plan's trial_tokens. Invoices are linked to their payment intent and charge through the
-- older fields, invoice.payments and invoice_payment.paid (API 2025-03-31 and later), so refunds
-- and disputes of subscription charges apply in both shapes. See docs/stripe-events.md.
-- Objects: billing.invoice_line_proration(), billing.apply_invoice_paid_event(),
--   billing.apply_invoice_payment_event(), billing.apply_invoice_closed_event().

create function billing.invoice_line_proration(p_line jsonb) returns boolean
language sql immutable
set search_path = ''
as $$
  select coalesce(
    case when jsonb_typeof(p_line -> 'proration') = 'boolean'
      then (p_line ->> 'proration')::boolean end,
    case when jsonb_typeof(p_line #> '{parent,subscription_item_details,proration}') = 'boolean'
      then (p_line #>> '{parent,subscription_item_details,proration}')::boolean end,
    case when jsonb_typeof(p_line #> '{parent,invoice_item_details,proration}') = 'boolean'
      then (p_line #>> '{parent,invoice_item_details,proration}')::boolean end,
    false
  )
$$;

comment on function billing.invoice_line_proration(jsonb) is
'Whether an invoice line is a proration, in either shape: line.proration (before API '
'2025-03-31), parent.subscription_item_details.proration or parent.invoice_item_details.proration '
'(after).';

revoke all on function billing.invoice_line_proration(jsonb) from public;

create or replace function billing.apply_invoice_paid_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_invoice jsonb := billing.require_stripe_object(p_event, 'invoice');
  v_invoice_id text := v_invoice ->> 'id';
  v_reason text := v_invoice ->> 'billing_reason';
  v_customer text := billing.stripe_ref(v_invoice -> 'customer');
  v_amount_paid bigint := coalesce(billing.stripe_bigint(v_invoice -> 'amount_paid', 'amount_paid'), 0);
  v_lines jsonb := case
    when jsonb_typeof(v_invoice #> '{lines,data}') = 'array' then v_invoice #> '{lines,data}'
    else '[]'
  end;
  v_line jsonb;
  v_old_line jsonb;
  v_code text;
  v_old_code text;
  v_product billing.products;
  v_old billing.products;
  v_subscription_id text;
  v_subscription billing.subscriptions;
  v_user_id uuid;
  v_problem text;
  v_quantity bigint;
  v_tokens bigint;
  v_fraction numeric;
  v_unit numeric;
  v_what text;
  v_period_end timestamptz;
  v_payment_intent text;
  v_charge text;
  v_credit record;
begin
  if v_reason is null
    or v_reason not in ('subscription_create', 'subscription_cycle', 'subscription_update') then
    return query select 'ignored'::text, format(
      'invoice %s (billing_reason %s): only subscription_create and subscription_cycle invoices '
      'grant plan tokens (and subscription_update ones, for plan changes)', v_invoice_id, coalesce(v_reason, 'null'));
    return;
  end if;

  -- The plan paid for: the first non-proration line with a plan's price.
  select l.line, p.code into v_line, v_code
  from jsonb_array_elements(v_lines) with ordinality as l (line, n)
  inner join billing.products as p
    on p.stripe_price_id = billing.invoice_line_price(l.line) and p.kind = 'plan'
  where not billing.invoice_line_proration(l.line)
  order by l.n
  limit 1;

  if v_code is null and v_reason = 'subscription_update' then
    -- A change invoiced at once: the new plan's remaining time (positive) against the old
    -- plan's unused time (negative).
    select l.line, p.code into v_line, v_code
    from jsonb_array_elements(v_lines) as l (line)
    inner join billing.products as p
      on p.stripe_price_id = billing.invoice_line_price(l.line) and p.kind = 'plan'
    where billing.invoice_line_proration(l.line)
      and coalesce(billing.stripe_bigint(l.line -> 'amount', 'line amount'), 0) > 0
    order by (l.line ->> 'amount')::numeric desc
    limit 1;
    select l.line, p.code into v_old_line, v_old_code
    from jsonb_array_elements(v_lines) as l (line)
    inner join billing.products as p
      on p.stripe_price_id = billing.invoice_line_price(l.line) and p.kind = 'plan'
    where billing.invoice_line_proration(l.line)
      and coalesce(billing.stripe_bigint(l.line -> 'amount', 'line amount'), 0) < 0
    order by (l.line ->> 'amount')::numeric
    limit 1;
    if v_code is null then
      return query select 'ignored'::text, format(
        'invoice %s (subscription_update): no proration line charges a plan: nothing to grant '
        '(a downgrade takes effect at the next period)', v_invoice_id);
      return;
    end if;
  end if;

  if v_code is null then
    return query select 'parked'::text, format(
      'invoice %s: no line''s price is a plan''s stripe_price_id (prices: %s)',
      v_invoice_id,
      coalesce((
        select string_agg(distinct billing.invoice_line_price(l.line), ', ')
        from jsonb_array_elements(v_lines) as l (line)
      ), 'none'));
    return;
  end if;
  select p.* into v_product from billing.products as p where p.code = v_code;

  v_subscription_id := coalesce(
    billing.stripe_ref(v_invoice -> 'subscription'),
    v_invoice #>> '{parent,subscription_details,subscription}',
    billing.stripe_ref(v_line -> 'subscription'),
    v_line #>> '{parent,subscription_item_details,subscription}'
  );
  select s.* into v_subscription from billing.subscriptions as s where s.id = v_subscription_id;

  select r.user_id, r.problem into v_user_id, v_problem
  from billing.resolve_stripe_user(
    array['subscription metadata.user_id'],
    array[coalesce(
      v_invoice #>> '{parent,subscription_details,metadata,user_id}',
      v_invoice #>> '{subscription_details,metadata,user_id}',
      v_line #>> '{metadata,user_id}'
    )],
    v_customer, v_subscription_id, true
  ) as r;
  if v_user_id is null then
    return query select 'parked'::text, format('invoice %s: %s', v_invoice_id, v_problem);
    return;
  end if;

  v_quantity := coalesce(billing.stripe_bigint(v_line -> 'quantity', 'line quantity'), 1);
  v_period_end := coalesce(
    to_timestamp(billing.stripe_bigint(v_line #> '{period,end}', 'line period.end')),
    v_subscription.current_period_end
  );

  if billing.invoice_line_proration(v_line) then
    -- Upgrade policy: (new tokens - old tokens) x the unused part of the period, rounded down.
    -- The unused part is the new plan's proration amount over its full price for the quantity:
    -- the line's price.unit_amount (before API 2025-03-31), else the catalog's price_cents.
    select p.* into v_old from billing.products as p where p.code = v_old_code;
    v_unit := coalesce(
      (v_line #>> '{price,unit_amount}')::numeric, v_product.price_cents::numeric,
      (v_line #>> '{pricing,unit_amount_decimal}')::numeric);
    v_fraction := case
      when coalesce(v_unit, 0) > 0
        then least(greatest((v_line ->> 'amount')::numeric / (v_unit * v_quantity), 0), 1)
      else 0
    end;
    v_tokens := floor(
      (v_product.tokens * v_quantity
        - coalesce(v_old.tokens * coalesce(billing.stripe_bigint(v_old_line -> 'quantity',
          'line quantity'), 1), 0))
      * v_fraction)::bigint;
    v_what := format('plan %s (upgrade from %s for %s of the period)', v_product.code,
      coalesce(v_old.code, 'none'), round(v_fraction, 4));
    if v_tokens <= 0 then
      return query select 'ignored'::text, format(
        'invoice %s: %s grants no tokens (a downgrade takes effect at the next period)',
        v_invoice_id, v_what);
      return;
    end if;
  elsif v_reason = 'subscription_create' and v_amount_paid = 0
    and coalesce(billing.stripe_bigint(v_line -> 'amount', 'line amount'), 0) = 0 then
    v_tokens := coalesce(v_product.trial_tokens, v_product.tokens) * v_quantity;
    v_what := format('plan %s (trial)', v_product.code);
  else
    v_tokens := v_product.tokens * v_quantity;
    v_what := format('plan %s', v_product.code);
  end if;
  if v_tokens <= 0 then
    return query select 'ignored'::text, format('invoice %s: %s x %s grants no tokens',
      v_invoice_id, v_what, v_quantity);
    return;
  end if;

  perform billing.ensure_account(v_user_id);
  if v_customer is not null then
    perform billing.link_customer(v_customer, v_user_id);
  end if;

  -- The payment refunds and disputes name: the older fields, the invoice's payments list, or an
  -- invoice_payment.paid that arrived first.
  select coalesce(billing.stripe_ref(v_invoice -> 'payment_intent'), x.pi),
    coalesce(billing.stripe_ref(v_invoice -> 'charge'), x.ch)
  into v_payment_intent, v_charge
  from (
    select
      coalesce(
        (select billing.stripe_ref(pay.value #> '{payment,payment_intent}')
          from jsonb_array_elements(case when jsonb_typeof(v_invoice #> '{payments,data}') = 'array'
            then v_invoice #> '{payments,data}' else '[]' end) as pay
          where pay.value #> '{payment,payment_intent}' is not null
          limit 1),
        (select ip.stripe_payment_intent_id from billing.stripe_invoice_payments as ip
          where ip.invoice_id = v_invoice_id and ip.stripe_payment_intent_id is not null
          order by ip.created_at limit 1)) as pi,
      coalesce(
        (select billing.stripe_ref(pay.value #> '{payment,charge}')
          from jsonb_array_elements(case when jsonb_typeof(v_invoice #> '{payments,data}') = 'array'
            then v_invoice #> '{payments,data}' else '[]' end) as pay
          where pay.value #> '{payment,charge}' is not null
          limit 1),
        (select ip.stripe_charge_id from billing.stripe_invoice_payments as ip
          where ip.invoice_id = v_invoice_id and ip.stripe_charge_id is not null
          order by ip.created_at limit 1)) as ch
  ) as x;

  -- A refund or dispute of this payment that is parking holds these (billing.lock_stripe_refs).
  perform billing.lock_stripe_refs(array[v_payment_intent, v_charge]);
  insert into billing.stripe_payments (
    id, source, user_id, product_code, quantity, tokens, amount_paid_cents, currency,
    stripe_payment_intent_id, stripe_charge_id
  )
  values (
    v_invoice_id, 'invoice', v_user_id, v_product.code, v_quantity, v_tokens, v_amount_paid,
    v_invoice ->> 'currency', v_payment_intent, v_charge
  )
  on conflict do nothing;

  select c.status, c.balance, c.entry_id into v_credit
  from billing.credit(
    v_user_id, v_tokens, 'stripe:invoice:' || v_invoice_id, 'subscription',
    format('Plan %s tokens for the period ending %s', v_product.code, v_period_end),
    case when v_product.rollover then null else v_period_end end,
    jsonb_build_object(
      'stripe_event_id', p_event ->> 'id', 'stripe_invoice', v_invoice_id,
      'stripe_subscription', v_subscription_id, 'product', v_product.code,
      'period_end', v_period_end)
  ) as c;

  if v_credit.status = 'applied' then
    return query select 'applied'::text, format(
      'granted %s tokens of %s to user %s%s (balance %s)', v_tokens, v_what, v_user_id,
      case when v_product.rollover then '' else format(', expiring %s', v_period_end) end,
      v_credit.balance);
  else
    return query select 'duplicate'::text, format(
      'invoice %s was already granted (ledger entry %s)', v_invoice_id, v_credit.entry_id);
  end if;
end;
$$;

comment on function billing.apply_invoice_paid_event(jsonb) is
'invoice.paid / invoice.payment_succeeded: grants once per invoice (key stripe:invoice:<invoice>) '
'the plan of its first non-proration plan line for that line''s period (a trial: trial_tokens), '
'or for an upgrade invoiced at once the scaled difference; nothing for a downgrade. Reads both '
'invoice shapes and links the invoice to its payment intent and charge.';

create function billing.apply_invoice_payment_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_object jsonb := billing.require_stripe_object(p_event, 'invoice_payment');
  v_invoice_id text := billing.stripe_ref(v_object -> 'invoice');
  v_payment_intent text := billing.stripe_ref(v_object #> '{payment,payment_intent}');
  v_charge text := billing.stripe_ref(v_object #> '{payment,charge}');
  v_payment billing.stripe_payments;
begin
  if coalesce(v_object ->> 'status', 'paid') <> 'paid' then
    return query select 'ignored'::text, format('invoice payment %s is %s: nothing to link',
      v_object ->> 'id', v_object ->> 'status');
    return;
  end if;
  if v_invoice_id is null or (v_payment_intent is null and v_charge is null) then
    return query select 'ignored'::text, format(
      'invoice payment %s names no invoice or no payment intent or charge: nothing to link',
      v_object ->> 'id');
    return;
  end if;

  perform billing.lock_stripe_refs(array[v_payment_intent, v_charge]);
  select p.* into v_payment from billing.stripe_payments as p where p.id = v_invoice_id for update;
  insert into billing.stripe_invoice_payments (id, invoice_id, stripe_payment_intent_id, stripe_charge_id)
  values (v_object ->> 'id', v_invoice_id, v_payment_intent, v_charge)
  on conflict (id) do nothing;

  if v_payment.id is null then
    return query select 'applied'::text, format(
      'invoice %s is paid by %s: remembered for when its invoice.paid arrives', v_invoice_id,
      coalesce(v_payment_intent, v_charge));
    return;
  end if;
  update billing.stripe_payments as p
  set
    stripe_payment_intent_id = coalesce(p.stripe_payment_intent_id, v_payment_intent),
    stripe_charge_id = coalesce(p.stripe_charge_id, v_charge),
    updated_at = now()
  where p.id = v_invoice_id
    and not exists (
      select 1 from billing.stripe_payments as o
      where o.id <> v_invoice_id
        and (o.stripe_payment_intent_id = v_payment_intent or o.stripe_charge_id = v_charge)
    );
  return query select 'applied'::text, format(
    'invoice %s is paid by %s: its refunds and disputes apply to its grant', v_invoice_id,
    coalesce(v_payment_intent, v_charge));
end;
$$;

comment on function billing.apply_invoice_payment_event(jsonb) is
'invoice_payment.paid (API 2025-03-31 and later): links the invoice to the payment intent or '
'charge that paid it, so refunds and disputes of that payment take from the invoice''s grant.';

revoke all on function billing.apply_invoice_payment_event(jsonb) from public;

create function billing.apply_invoice_closed_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_invoice jsonb := billing.require_stripe_object(p_event, 'invoice');
begin
  return query select 'ignored'::text, format(
    'invoice %s %s: recorded, grants nothing (the subscription''s own events change its status)',
    v_invoice ->> 'id',
    case when p_event ->> 'type' = 'invoice.voided' then 'voided' else 'marked uncollectible' end);
end;
$$;

comment on function billing.apply_invoice_closed_event(jsonb) is
'invoice.voided / invoice.marked_uncollectible: stored as ignored; nothing was paid, so nothing '
'is granted (an uncollectible invoice paid later grants through invoice.paid).';

revoke all on function billing.apply_invoice_closed_event(jsonb) from public;

insert into billing.schema_migrations (version, name) values ('20261202200120', 'stripe_invoices_v2');
