-- Migration: Stripe invoice events.
--
-- Purpose: a paid subscription invoice grants the plan's tokens for its period once (keyed
-- stripe:invoice:<invoice>); a failed one marks the subscription past_due. See
-- docs/stripe-events.md.
-- Objects: billing.apply_invoice_paid_event(), billing.apply_invoice_payment_failed_event().

create function billing.apply_invoice_paid_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_invoice jsonb := billing.require_stripe_object(p_event, 'invoice');
  v_invoice_id text := v_invoice ->> 'id';
  v_reason text := v_invoice ->> 'billing_reason';
  v_customer text := billing.stripe_ref(v_invoice -> 'customer');
  v_lines jsonb := case
    when jsonb_typeof(v_invoice #> '{lines,data}') = 'array' then v_invoice #> '{lines,data}'
    else '[]'
  end;
  v_line jsonb;
  v_code text;
  v_product billing.products;
  v_subscription_id text;
  v_subscription billing.subscriptions;
  v_user_id uuid;
  v_problem text;
  v_quantity bigint;
  v_tokens bigint;
  v_period_end timestamptz;
  v_credit record;
begin
  if v_reason is null or v_reason not in ('subscription_create', 'subscription_cycle') then
    return query select 'ignored'::text, format(
      'invoice %s (billing_reason %s): only subscription_create and subscription_cycle invoices '
      'grant plan tokens', v_invoice_id, coalesce(v_reason, 'null'));
    return;
  end if;

  select l.line, p.code into v_line, v_code
  from jsonb_array_elements(v_lines) with ordinality as l (line, n)
  inner join billing.products as p
    on p.stripe_price_id = billing.invoice_line_price(l.line) and p.kind = 'plan'
  order by l.n
  limit 1;
  if v_code is null then
    return query select 'parked'::text, format(
      'invoice %s: no line''s price is a plan''s stripe_price_id (prices: %s)', v_invoice_id,
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
  if v_subscription.status in ('canceled', 'incomplete_expired') then
    return query select 'ignored'::text, format(
      'invoice %s: subscription %s is %s, no grant', v_invoice_id, v_subscription_id,
      v_subscription.status);
    return;
  end if;

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
  v_tokens := v_product.tokens * v_quantity;
  if v_tokens <= 0 then
    return query select 'ignored'::text, format('invoice %s: plan %s x %s grants no tokens',
      v_invoice_id, v_product.code, v_quantity);
    return;
  end if;
  v_period_end := coalesce(
    to_timestamp(billing.stripe_bigint(v_line #> '{period,end}', 'line period.end')),
    v_subscription.current_period_end
  );

  perform billing.ensure_account(v_user_id);
  if v_customer is not null then
    perform billing.link_customer(v_customer, v_user_id);
  end if;

  insert into billing.stripe_payments (
    id, source, user_id, product_code, quantity, tokens, amount_paid_cents, currency,
    stripe_payment_intent_id, stripe_charge_id
  )
  values (
    v_invoice_id, 'invoice', v_user_id, v_product.code, v_quantity, v_tokens,
    coalesce(billing.stripe_bigint(v_invoice -> 'amount_paid', 'amount_paid'), 0),
    v_invoice ->> 'currency', billing.stripe_ref(v_invoice -> 'payment_intent'),
    billing.stripe_ref(v_invoice -> 'charge')
  )
  on conflict (id) do nothing;

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
      'granted %s tokens of plan %s to user %s%s (balance %s)', v_tokens, v_product.code,
      v_user_id,
      case when v_product.rollover then '' else format(', expiring %s', v_period_end) end,
      v_credit.balance);
  else
    return query select 'duplicate'::text, format(
      'invoice %s was already granted (ledger entry %s)', v_invoice_id, v_credit.entry_id);
  end if;
end;
$$;

comment on function billing.apply_invoice_paid_event(jsonb) is
'invoice.paid / invoice.payment_succeeded: for subscription_create and subscription_cycle '
'invoices, grants the plan''s tokens once per invoice (key stripe:invoice:<invoice>), expiring at '
'the line''s period end unless the plan rolls over. Reads both invoice shapes.';

revoke all on function billing.apply_invoice_paid_event(jsonb) from public;

create function billing.apply_invoice_payment_failed_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_invoice jsonb := billing.require_stripe_object(p_event, 'invoice');
  v_invoice_id text := v_invoice ->> 'id';
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_subscription_id text;
  v_subscription billing.subscriptions;
  v_status text;
begin
  v_subscription_id := coalesce(
    billing.stripe_ref(v_invoice -> 'subscription'),
    v_invoice #>> '{parent,subscription_details,subscription}',
    (
      select coalesce(
        billing.stripe_ref(l.line -> 'subscription'),
        l.line #>> '{parent,subscription_item_details,subscription}')
      from jsonb_array_elements(
        case when jsonb_typeof(v_invoice #> '{lines,data}') = 'array'
          then v_invoice #> '{lines,data}' else '[]' end
      ) with ordinality as l (line, n)
      order by l.n
      limit 1
    )
  );
  if v_subscription_id is null then
    return query select 'ignored'::text,
      format('invoice %s is not a subscription''s: nothing to change', v_invoice_id);
    return;
  end if;

  select s.* into v_subscription
  from billing.subscriptions as s
  where s.id = v_subscription_id
  for update;
  if not found then
    return query select 'parked'::text, format(
      'invoice %s: subscription %s is not recorded yet (replay after its customer.subscription '
      'event)', v_invoice_id, v_subscription_id);
    return;
  end if;
  if v_created < v_subscription.last_event_created then
    return query select 'stale'::text, format(
      'invoice %s: subscription %s changed after this failure (%s > %s)', v_invoice_id,
      v_subscription_id, v_subscription.last_event_created, v_created);
    return;
  end if;
  if v_subscription.status in ('canceled', 'incomplete_expired') then
    return query select 'ignored'::text, format('invoice %s: subscription %s is already %s',
      v_invoice_id, v_subscription_id, v_subscription.status);
    return;
  end if;

  -- The first invoice failing leaves the subscription incomplete; a renewal, past_due.
  v_status := case
    when v_invoice ->> 'billing_reason' = 'subscription_create' then 'incomplete'
    else 'past_due'
  end;
  update billing.subscriptions as s
  set
    status = v_status,
    last_event_id = p_event ->> 'id',
    last_event_created = v_created,
    updated_at = now()
  where s.id = v_subscription_id;
  perform billing.sync_account_plan(v_subscription.user_id);

  return query select 'applied'::text, format(
    'subscription %s of user %s is %s after invoice %s failed', v_subscription_id,
    v_subscription.user_id, v_status, v_invoice_id);
end;
$$;

comment on function billing.apply_invoice_payment_failed_event(jsonb) is
'invoice.payment_failed: marks the recorded subscription past_due (incomplete for its first '
'invoice) and syncs the account; stale when the subscription changed after the failure.';

revoke all on function billing.apply_invoice_payment_failed_event(jsonb) from public;

insert into billing.schema_migrations (version, name) values ('20261121001020', 'stripe_invoices');
