-- Migration: Stripe Checkout events.
--
-- Purpose: checkout.session.completed and .async_payment_succeeded credit a paid token pack once
-- (keyed stripe:checkout:<session>) and remember the payment for refunds and disputes; a
-- subscription checkout links the customer (its invoices grant the tokens). See
-- docs/stripe-events.md.
-- Objects: billing.apply_checkout_session_event().

create function billing.apply_checkout_session_event(p_event jsonb)
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
  v_quantity_text text := coalesce(v_session #>> '{metadata,quantity}', '1');
  v_product billing.products;
  v_user_id uuid;
  v_problem text;
  v_owner uuid;
  v_tokens bigint;
  v_credit record;
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

  select r.user_id, r.problem into v_user_id, v_problem
  from billing.resolve_stripe_user(
    array['client_reference_id', 'metadata.user_id'],
    array[v_session ->> 'client_reference_id', v_session #>> '{metadata,user_id}'],
    v_customer
  ) as r;

  if v_mode = 'subscription' then
    if v_customer is null then
      return query select 'ignored'::text,
        format('checkout session %s (subscription) has no customer to link', v_session_id);
      return;
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

  -- Any pack, active or not: the customer has paid for it.
  select p.* into v_product
  from billing.products as p
  where p.code = v_session #>> '{metadata,product}' and p.kind = 'pack';
  if not found then
    return query select 'parked'::text, format(
      'checkout session %s: metadata.product %s is not a token pack in billing.products',
      v_session_id, coalesce(quote_literal(v_session #>> '{metadata,product}'), '(missing)'));
    return;
  end if;
  if v_quantity_text !~ '^[1-9][0-9]{0,5}$' then
    return query select 'parked'::text, format(
      'checkout session %s: metadata.quantity %s is not a whole number from 1 to 999999',
      v_session_id, quote_literal(v_quantity_text));
    return;
  end if;
  if v_user_id is null then
    return query select 'parked'::text, format('checkout session %s: %s', v_session_id, v_problem);
    return;
  end if;

  perform billing.ensure_account(v_user_id);
  if v_customer is not null then
    perform billing.link_customer(v_customer, v_user_id);
  end if;
  v_tokens := v_product.tokens * v_quantity_text::integer;

  -- Remembered for refunds and disputes. The insert also makes a concurrent event for the same
  -- session wait until this one commits.
  insert into billing.stripe_payments (
    id, source, user_id, product_code, quantity, tokens, amount_paid_cents, currency,
    stripe_payment_intent_id
  )
  values (
    v_session_id, 'checkout_session', v_user_id, v_product.code, v_quantity_text::integer,
    v_tokens,
    coalesce(billing.stripe_bigint(v_session -> 'amount_total', 'amount_total'), 0),
    v_session ->> 'currency', billing.stripe_ref(v_session -> 'payment_intent')
  )
  on conflict (id) do nothing;

  select c.status, c.balance, c.entry_id into v_credit
  from billing.credit(
    v_user_id, v_tokens, 'stripe:checkout:' || v_session_id, 'purchase',
    format('Token pack %s x %s', v_product.code, v_quantity_text), null,
    jsonb_build_object(
      'stripe_event_id', p_event ->> 'id', 'stripe_checkout_session', v_session_id,
      'product', v_product.code, 'quantity', v_quantity_text::integer)
  ) as c;

  if v_credit.status = 'applied' then
    return query select 'applied'::text, format(
      'credited %s tokens (%s x %s) to user %s (balance %s)',
      v_tokens, v_product.code, v_quantity_text, v_user_id, v_credit.balance);
  else
    return query select 'duplicate'::text, format(
      'checkout session %s was already credited (ledger entry %s)', v_session_id, v_credit.entry_id);
  end if;
end;
$$;

comment on function billing.apply_checkout_session_event(jsonb) is
'checkout.session.completed / async_payment_succeeded / async_payment_failed / expired: credits '
'a paid token pack once per session (key stripe:checkout:<session>), links the customer of a '
'subscription checkout, parks what has no pack or no user.';

revoke all on function billing.apply_checkout_session_event(jsonb) from public;

insert into billing.schema_migrations (version, name) values ('20261121001010', 'stripe_checkout');
