-- Migration: Stripe Checkout and PaymentIntent events, crediting only what was sold.
--
-- Purpose: a paid token-pack Checkout Session credits from the service's record of it
-- (record_checkout_session), the amount and currency paid cross-checked; a session the service
-- did not create (a Payment Link, the dashboard) credits only when the line items the service
-- expanded into the event carry a price mapped to a pack, and parks otherwise.
-- payment_intent.succeeded credits a PaymentIntent the service recorded (Stripe's Payment
-- Element). A payment intent credits once across both event types (stripe_payments'
-- payment intent is unique). See docs/stripe-events.md.
-- Objects: billing.credit_stripe_sale(), billing.apply_checkout_session_event(),
--   billing.apply_payment_intent_event().

create function billing.credit_stripe_sale(
  p_event jsonb,
  p_payment_id text,
  p_source text,
  p_user_id uuid,
  p_product billing.products,
  p_quantity integer,
  p_amount_cents bigint,
  p_currency text,
  p_payment_intent_id text,
  p_customer text
) returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_tokens bigint := p_product.tokens * p_quantity;
  v_key text := case
    when p_source = 'checkout_session' then 'stripe:checkout:' || p_payment_id
    else 'stripe:payment_intent:' || p_payment_id
  end;
  v_owner uuid;
  v_other text;
  v_credit record;
begin
  perform billing.ensure_account(p_user_id);
  if p_customer is not null then
    v_owner := billing.link_customer(p_customer, p_user_id);
    if v_owner <> p_user_id then
      return query select 'ignored'::text, format(
        '%s %s: customer %s belongs to user %s, not %s; nothing credited',
        replace(p_source, '_', ' '), p_payment_id, p_customer, v_owner, p_user_id);
      return;
    end if;
  end if;

  -- Remembered for refunds and disputes. The insert also makes a concurrent event for the same
  -- payment (or the same payment intent, through the other event type) wait for this one; the
  -- lock, a refund or dispute of it that is parking (billing.lock_stripe_refs).
  perform billing.lock_stripe_refs(array[p_payment_intent_id]);
  insert into billing.stripe_payments (
    id, source, user_id, product_code, quantity, tokens, amount_paid_cents, currency,
    stripe_payment_intent_id
  )
  values (
    p_payment_id, p_source, p_user_id, p_product.code, p_quantity, v_tokens, p_amount_cents,
    p_currency, p_payment_intent_id
  )
  on conflict do nothing;
  if not found then
    select p.id into v_other from billing.stripe_payments as p
    where p.id = p_payment_id
      or (p_payment_intent_id is not null and p.stripe_payment_intent_id = p_payment_intent_id)
    order by p.id = p_payment_id desc
    limit 1;
    if v_other is distinct from p_payment_id then
      return query select 'duplicate'::text, format(
        'payment intent %s was already credited as %s', p_payment_intent_id, v_other);
      return;
    end if;
  end if;

  select c.status, c.balance, c.entry_id into v_credit
  from billing.credit(
    p_user_id, v_tokens, v_key, 'purchase',
    format('Token pack %s x %s', p_product.code, p_quantity), null,
    jsonb_build_object(
      'stripe_event_id', p_event ->> 'id',
      case when p_source = 'checkout_session' then 'stripe_checkout_session'
        else 'stripe_payment_intent' end, p_payment_id,
      'product', p_product.code, 'quantity', p_quantity)
  ) as c;

  if v_credit.status = 'applied' then
    return query select 'applied'::text, format(
      'credited %s tokens (%s x %s) to user %s (balance %s)',
      v_tokens, p_product.code, p_quantity, p_user_id, v_credit.balance);
  else
    return query select 'duplicate'::text, format(
      '%s %s was already credited (ledger entry %s)', replace(p_source, '_', ' '), p_payment_id,
      v_credit.entry_id);
  end if;
end;
$$;

comment on function billing.credit_stripe_sale(
  jsonb, text, text, uuid, billing.products, integer, bigint, text, text, text
) is
'Credits a paid pack once (key stripe:checkout:<session> or stripe:payment_intent:<intent>) and '
'records the payment for refunds and disputes; duplicate when the payment intent was already '
'credited through the other event type; ignored when the customer belongs to another user.';

revoke all on function billing.credit_stripe_sale(
  jsonb, text, text, uuid, billing.products, integer, bigint, text, text, text
) from public;

create or replace function billing.apply_checkout_session_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_type text := p_event ->> 'type';
  v_session jsonb := billing.require_stripe_object(p_event, 'checkout.session');
  v_session_id text := v_session ->> 'id';
  v_mode text := v_session ->> 'mode';
  v_customer text := billing.stripe_ref(v_session -> 'customer');
  v_amount bigint := billing.stripe_bigint(v_session -> 'amount_total', 'amount_total');
  v_currency text := lower(v_session ->> 'currency');
  v_sale billing.stripe_sales;
  v_product billing.products;
  v_quantity bigint;
  v_code text;
  v_user_id uuid;
  v_problem text;
  v_owner uuid;
begin
  if v_type = 'checkout.session.expired' then
    return query select 'ignored'::text,
      format('checkout session %s expired: nothing to credit', v_session_id);
    return;
  end if;
  if v_type = 'checkout.session.async_payment_failed' then
    return query select 'ignored'::text,
      format('checkout session %s: the delayed payment failed, nothing to credit', v_session_id);
    return;
  end if;

  if v_session ->> 'client_reference_id' is not null
    and v_session #>> '{metadata,user_id}' is not null
    and v_session ->> 'client_reference_id' <> v_session #>> '{metadata,user_id}' then
    return query select 'parked'::text, format(
      'checkout session %s: client_reference_id %s and metadata.user_id %s disagree',
      v_session_id, v_session ->> 'client_reference_id', v_session #>> '{metadata,user_id}');
    return;
  end if;

  select s.* into v_sale from billing.stripe_sales as s where s.id = v_session_id;

  if v_mode = 'subscription' then
    if v_customer is null then
      return query select 'ignored'::text,
        format('checkout session %s (subscription) has no customer to link', v_session_id);
      return;
    end if;
    if v_sale.id is not null then
      v_user_id := v_sale.user_id;
    else
      select r.user_id, r.problem into v_user_id, v_problem
      from billing.resolve_stripe_user(
        array['client_reference_id', 'metadata.user_id'],
        array[v_session ->> 'client_reference_id', v_session #>> '{metadata,user_id}'],
        v_customer
      ) as r;
    end if;
    if v_user_id is null then
      return query select 'parked'::text, format('checkout session %s: %s', v_session_id, v_problem);
      return;
    end if;
    perform billing.ensure_account(v_user_id);
    v_owner := billing.link_customer(v_customer, v_user_id);
    if v_owner <> v_user_id then
      return query select 'ignored'::text, format(
        'checkout session %s: customer %s belongs to user %s, not %s; not relinked',
        v_session_id, v_customer, v_owner, v_user_id);
      return;
    end if;
    return query select 'applied'::text, format(
      'checkout session %s: customer %s linked to user %s; its invoices grant the plan tokens',
      v_session_id, v_customer, v_user_id);
    return;
  end if;

  if v_mode is distinct from 'payment' then
    return query select 'ignored'::text, format('checkout session %s in %s mode: nothing to credit',
      v_session_id, coalesce(v_mode, 'no'));
    return;
  end if;
  if v_type = 'checkout.session.completed'
    and coalesce(v_session ->> 'payment_status', '') not in ('paid', 'no_payment_required') then
    return query select 'ignored'::text, format(
      'checkout session %s completed with payment_status %s: nothing to credit until '
      'checkout.session.async_payment_succeeded',
      v_session_id, coalesce(v_session ->> 'payment_status', 'null'));
    return;
  end if;

  if v_sale.id is not null then
    -- What was sold: the record, checked against what was paid.
    if (v_amount, v_currency) is distinct from (v_sale.amount_cents, v_sale.currency) then
      return query select 'parked'::text, format(
        'checkout session %s paid %s %s, but it was sold for %s %s: not credited',
        v_session_id, coalesce(v_amount::text, 'null'), coalesce(v_currency, 'null'),
        v_sale.amount_cents, v_sale.currency);
      return;
    end if;
    select p.* into v_product from billing.products as p where p.code = v_sale.product_code;
    if v_product.kind <> 'pack' then
      return query select 'ignored'::text, format(
        'checkout session %s sold %s, which is not a token pack', v_session_id, v_product.code);
      return;
    end if;
    return query select * from billing.credit_stripe_sale(
      p_event, v_session_id, 'checkout_session', v_sale.user_id, v_product, v_sale.quantity,
      v_amount, v_currency, billing.stripe_ref(v_session -> 'payment_intent'), v_customer);
    return;
  end if;

  -- Not created by the service (a Payment Link, the dashboard): the line items say what was sold.
  select p.code, l.quantity into v_code, v_quantity
  from (
    select
      coalesce(billing.stripe_ref(li.item -> 'price'), li.item #>> '{pricing,price_details,price}')
        as price_id,
      coalesce(billing.stripe_bigint(li.item -> 'quantity', 'line_items quantity'), 1) as quantity,
      count(*) over () as lines
    from jsonb_array_elements(
      case when jsonb_typeof(v_session #> '{line_items,data}') = 'array'
        then v_session #> '{line_items,data}' else '[]' end
    ) as li (item)
  ) as l
  inner join billing.products as p on p.stripe_price_id = l.price_id and p.kind = 'pack'
  where l.lines = 1;
  select p.* into v_product from billing.products as p where p.code = v_code;
  if v_code is null then
    return query select 'parked'::text, format(
      'checkout session %s was not recorded by the service (record_checkout_session) and has no '
      'single line item whose price is a pack''s stripe_price_id: not credited', v_session_id);
    return;
  end if;
  if v_quantity not between 1 and 999999 then
    return query select 'parked'::text, format(
      'checkout session %s: line item quantity %s is not from 1 to 999999', v_session_id,
      v_quantity);
    return;
  end if;
  select r.user_id, r.problem into v_user_id, v_problem
  from billing.resolve_stripe_user(
    array['client_reference_id', 'metadata.user_id'],
    array[v_session ->> 'client_reference_id', v_session #>> '{metadata,user_id}'],
    v_customer
  ) as r;
  if v_user_id is null then
    return query select 'parked'::text, format('checkout session %s: %s', v_session_id, v_problem);
    return;
  end if;
  return query select * from billing.credit_stripe_sale(
    p_event, v_session_id, 'checkout_session', v_user_id, v_product, v_quantity::integer,
    coalesce(v_amount, 0), v_currency, billing.stripe_ref(v_session -> 'payment_intent'),
    v_customer);
end;
$$;

comment on function billing.apply_checkout_session_event(jsonb) is
'checkout.session.completed / async_payment_succeeded / async_payment_failed / expired: credits '
'a paid token pack once per session from the service''s record (amount and currency checked), or '
'from its one pack line item when the service did not create it; links the customer of a '
'subscription checkout; parks what cannot be tied to a sale or a user.';

create function billing.apply_payment_intent_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_intent jsonb := billing.require_stripe_object(p_event, 'payment_intent');
  v_intent_id text := v_intent ->> 'id';
  v_amount bigint := coalesce(
    billing.stripe_bigint(v_intent -> 'amount_received', 'amount_received'),
    billing.stripe_bigint(v_intent -> 'amount', 'amount'));
  v_currency text := lower(v_intent ->> 'currency');
  v_sale billing.stripe_sales;
  v_product billing.products;
begin
  if coalesce(v_intent ->> 'status', 'succeeded') <> 'succeeded' then
    return query select 'ignored'::text, format('payment intent %s is %s: nothing to credit',
      v_intent_id, v_intent ->> 'status');
    return;
  end if;
  select s.* into v_sale from billing.stripe_sales as s
  where s.id = v_intent_id and s.kind = 'payment_intent';
  if not found then
    return query select 'ignored'::text, format(
      'payment intent %s was not recorded by the service (record_payment_intent): a Checkout '
      'Session''s payment is credited by its checkout.session event', v_intent_id);
    return;
  end if;
  if (v_amount, v_currency) is distinct from (v_sale.amount_cents, v_sale.currency) then
    return query select 'parked'::text, format(
      'payment intent %s received %s %s, but it was sold for %s %s: not credited', v_intent_id,
      coalesce(v_amount::text, 'null'), coalesce(v_currency, 'null'), v_sale.amount_cents,
      v_sale.currency);
    return;
  end if;
  select p.* into v_product from billing.products as p where p.code = v_sale.product_code;
  return query select * from billing.credit_stripe_sale(
    p_event, v_intent_id, 'payment_intent', v_sale.user_id, v_product, v_sale.quantity, v_amount,
    v_currency, v_intent_id, billing.stripe_ref(v_intent -> 'customer'));
end;
$$;

comment on function billing.apply_payment_intent_event(jsonb) is
'payment_intent.succeeded: credits a PaymentIntent the service recorded (Stripe''s Payment '
'Element) once, key stripe:payment_intent:<intent>, the amount and currency checked; ignores one '
'it did not record (a Checkout Session''s payment intent credits through the session).';

revoke all on function billing.apply_payment_intent_event(jsonb) from public;

insert into billing.schema_migrations (version, name) values ('20261202200110', 'stripe_checkout_v2');
