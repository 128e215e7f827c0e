-- Migration: the Stripe event handler's shared helpers.
--
-- Purpose: public.handle_stripe_event() (20261121001050_stripe_dispatch.sql) is the whole of the
-- payment logic; the webhook service only verifies the signature and hands the event over. This
-- migration holds what every event family uses: reading payload fields, finding the user an
-- event belongs to, keeping the account's plan in step with its subscriptions, and the payment
-- records that refunds and disputes claw back from. What each event does is in
-- docs/stripe-events.md.
-- Objects: billing.stripe_ref(), billing.stripe_bigint(), billing.require_stripe_event(),
--   billing.require_stripe_object(), billing.invoice_line_price(), billing.resolve_stripe_user(),
--   billing.ensure_account(), billing.sync_account_plan(), billing.lock_stripe_payment(),
--   billing.refunded_cents(), billing.untaken_tokens(), billing.claw_back_refunded_tokens().
--
-- Lock order (no deadlocks): the event row first, the account last (through the ledger primitives
-- or sync_account_plan), one account per event. In between an event locks the rows of one Stripe
-- object (its subscription; or its payment, then its dispute) and inserts the customer link;
-- nothing waits for one of those while holding an account. A missing account is opened before
-- them, so the only account an event can wait for is its own, at the end.

-- Reading payloads ------------------------------------------------------------------------------

create function billing.stripe_ref(p_value jsonb) returns text
language sql immutable
set search_path = ''
as $$
  select case jsonb_typeof(p_value)
    when 'string' then nullif(p_value #>> '{}', '')
    when 'object' then nullif(p_value ->> 'id', '')
  end
$$;

comment on function billing.stripe_ref(jsonb) is
'The id a Stripe reference field holds, whether it is an id string or an expanded object; null '
'otherwise.';

revoke all on function billing.stripe_ref(jsonb) from public;

create function billing.stripe_bigint(p_value jsonb, p_name text) returns bigint
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_value is null or jsonb_typeof(p_value) = 'null' then
    return null;
  end if;
  if jsonb_typeof(p_value) <> 'number'
    or (p_value #>> '{}')::numeric <> trunc((p_value #>> '{}')::numeric)
    or abs((p_value #>> '{}')::numeric) > 1000000000000000 then
    raise exception using
      errcode = '22023',
      message = format('%s must be an integer, got %s', p_name, p_value::text);
  end if;
  return (p_value #>> '{}')::numeric::bigint;
end;
$$;

comment on function billing.stripe_bigint(jsonb, text) is
'The integer a JSON number holds (null for missing or null); raises 22023 naming the field for '
'anything else or beyond 10^15.';

revoke all on function billing.stripe_bigint(jsonb, text) from public;

create function billing.require_stripe_event(p_event jsonb) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_event is null or jsonb_typeof(p_event) <> 'object' then
    raise exception using
      errcode = '22023',
      message = format('p_event must be a Stripe event (a JSON object), got %s',
        coalesce(jsonb_typeof(p_event), 'null'));
  end if;
  if p_event ->> 'object' = 'v2.core.event'
    or (p_event ? 'related_object' and jsonb_typeof(p_event #> '{data,object}') is distinct from 'object') then
    raise exception using
      errcode = '22023',
      message = format('p_event %s is a thin (v2) event, which carries no object: not supported',
        coalesce(p_event ->> 'id', 'without id')),
      hint = 'Configure the webhook endpoint for snapshot events (the v1 event payloads).';
  end if;
  if p_event ? 'object' and p_event ->> 'object' is distinct from 'event' then
    raise exception using
      errcode = '22023',
      message = format('p_event.object must be "event", got %s', p_event -> 'object');
  end if;
  if jsonb_typeof(p_event -> 'id') is distinct from 'string'
    or length(p_event ->> 'id') not between 1 and 255 then
    raise exception using
      errcode = '22023',
      message = 'p_event.id must be a non-empty string of at most 255 characters (evt_...)';
  end if;
  if jsonb_typeof(p_event -> 'type') is distinct from 'string'
    or length(p_event ->> 'type') not between 1 and 255 then
    raise exception using
      errcode = '22023',
      message = format('p_event.type of event %s must be a non-empty string', p_event ->> 'id');
  end if;
  if jsonb_typeof(p_event -> 'created') is distinct from 'number' then
    raise exception using
      errcode = '22023',
      message = format('p_event.created of event %s must be a Unix timestamp', p_event ->> 'id');
  end if;
  perform billing.stripe_bigint(p_event -> 'created', 'p_event.created');
  if jsonb_typeof(p_event #> '{data,object}') is distinct from 'object' then
    raise exception using
      errcode = '22023',
      message = format('p_event.data.object of event %s must be a JSON object', p_event ->> 'id');
  end if;
  if p_event ? 'livemode' and jsonb_typeof(p_event -> 'livemode') <> 'boolean' then
    raise exception using
      errcode = '22023',
      message = format('p_event.livemode of event %s must be a boolean', p_event ->> 'id');
  end if;
end;
$$;

comment on function billing.require_stripe_event(jsonb) is
'Raises 22023 with the reason unless p_event is a v1 (snapshot) Stripe event: an object with a '
'string id and type, an integer created and an object in data.object.';

revoke all on function billing.require_stripe_event(jsonb) from public;

create function billing.require_stripe_object(p_event jsonb, p_object text) returns jsonb
language plpgsql immutable
set search_path = ''
as $$
declare
  v_object jsonb := p_event #> '{data,object}';
begin
  -- Stripe always names the object; trimmed payloads may not, which is accepted.
  if coalesce(v_object ->> 'object', p_object) <> p_object
    or jsonb_typeof(v_object -> 'id') is distinct from 'string'
    or length(v_object ->> 'id') not between 1 and 250 then
    raise exception using
      errcode = '22023',
      message = format('p_event.data.object of %s event %s must be a %s with an id, got %s %s',
        p_event ->> 'type', p_event ->> 'id', p_object,
        coalesce(quote_literal(v_object ->> 'object'), 'an object'),
        coalesce(quote_literal(v_object ->> 'id'), 'without id'));
  end if;
  return v_object;
end;
$$;

comment on function billing.require_stripe_object(jsonb, text) is
'The event''s data.object; raises 22023 unless it has an id and its object field, if any, is '
'p_object.';

revoke all on function billing.require_stripe_object(jsonb, text) from public;

create function billing.invoice_line_price(p_line jsonb) returns text
language sql immutable
set search_path = ''
as $$
  select coalesce(
    p_line #>> '{pricing,price_details,price}',
    billing.stripe_ref(p_line -> 'price'),
    billing.stripe_ref(p_line -> 'plan')
  )
$$;

comment on function billing.invoice_line_price(jsonb) is
'The price id of an invoice line in either shape: pricing.price_details.price (API 2025-03-31 '
'and later), price.id or plan.id (before).';

revoke all on function billing.invoice_line_price(jsonb) from public;

-- Users and accounts ----------------------------------------------------------------------------

create function billing.resolve_stripe_user(
  p_sources text[],
  p_values text[],
  p_stripe_customer_id text,
  p_subscription_id text default null,
  p_customer_first boolean default false,
  out user_id uuid,
  out problem text
)
language plpgsql stable
set search_path = ''
as $$
begin
  if p_customer_first and p_stripe_customer_id is not null then
    select c.user_id into user_id
    from billing.customers as c
    where c.stripe_customer_id = p_stripe_customer_id;
    if user_id is not null then
      return;
    end if;
  end if;

  for v_index in 1 .. coalesce(array_length(p_values, 1), 0) loop
    if nullif(btrim(p_values[v_index]), '') is not null then
      if p_values[v_index] !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
        problem := format('%s %s is not a user id', p_sources[v_index], quote_literal(p_values[v_index]));
        return;
      end if;
      user_id := p_values[v_index]::uuid;
      return;
    end if;
  end loop;

  if p_stripe_customer_id is not null then
    select c.user_id into user_id
    from billing.customers as c
    where c.stripe_customer_id = p_stripe_customer_id;
    if user_id is not null then
      return;
    end if;
  end if;

  if p_subscription_id is not null then
    select s.user_id into user_id
    from billing.subscriptions as s
    where s.id = p_subscription_id;
    if user_id is not null then
      return;
    end if;
  end if;

  problem := format('no user: no %s, customer %s is not linked (link_stripe_customer)%s',
    array_to_string(p_sources, ' nor '), coalesce(p_stripe_customer_id, '(none)'),
    case when p_subscription_id is not null
      then format(', subscription %s is not recorded', p_subscription_id) else '' end);
end;
$$;

comment on function billing.resolve_stripe_user(text[], text[], text, text, boolean) is
'The user an event belongs to: the first non-empty p_values (named by p_sources), else the '
'customer''s link, else the recorded subscription''s user (with p_customer_first the link comes '
'first). Without one, or when a value is not a uuid, user_id is null and problem says why.';

revoke all on function billing.resolve_stripe_user(text[], text[], text, text, boolean) from public;

create function billing.ensure_account(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
begin
  -- Only when missing: open_account on an existing account would lock it (its signup credit
  -- replays), and the handler locks accounts last.
  if not exists (select 1 from billing.accounts as a where a.user_id = p_user_id) then
    perform billing.open_account(p_user_id);
  end if;
end;
$$;

comment on function billing.ensure_account(uuid) is
'Opens the user''s account (with the signup grant) when it does not exist; takes no lock on an '
'existing one.';

revoke all on function billing.ensure_account(uuid) from public;

create function billing.sync_account_plan(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_plan text;
  v_status text;
begin
  select s.product_code, s.status into v_plan, v_status
  from billing.subscriptions as s
  where s.user_id = p_user_id
  order by s.status in ('active', 'trialing', 'past_due') desc, s.last_event_created desc, s.id desc
  limit 1;
  if not found then
    return;
  end if;
  if v_status not in ('active', 'trialing', 'past_due') then
    v_plan := 'free';
  end if;

  update billing.accounts as a
  set plan = v_plan, subscription_status = v_status, updated_at = now()
  where a.user_id = p_user_id
    and (a.plan, a.subscription_status) is distinct from (v_plan, v_status);
end;
$$;

comment on function billing.sync_account_plan(uuid) is
'Sets accounts.plan and subscription_status from the user''s subscriptions: the newest entitled '
'one (active, trialing, past_due) gives its plan; otherwise the plan is free with the newest '
'subscription''s status (canceled, unpaid, incomplete, ...). No change without subscriptions.';

revoke all on function billing.sync_account_plan(uuid) from public;

-- Payments --------------------------------------------------------------------------------------

create function billing.lock_stripe_payment(
  p_payment_intent_id text,
  p_charge_id text
) returns billing.stripe_payments
language sql
set search_path = ''
as $$
  select p.*
  from billing.stripe_payments as p
  where p.stripe_payment_intent_id = p_payment_intent_id or p.stripe_charge_id = p_charge_id
  order by p.stripe_payment_intent_id = p_payment_intent_id desc nulls last
  limit 1
  for update
$$;

comment on function billing.lock_stripe_payment(text, text) is
'Locks and returns the recorded payment with this payment intent (else this charge); all fields '
'null when there is none.';

revoke all on function billing.lock_stripe_payment(text, text) from public;

create function billing.refunded_cents(p_payment_id text) returns bigint
language sql stable
set search_path = ''
as $$
  select greatest(
    p.refunded_cents,
    coalesce((
      select sum(r.amount_cents)
      from billing.stripe_refunds as r
      where r.payment_id = p.id and coalesce(r.status, '') not in ('failed', 'canceled')
    ), 0)
  )::bigint
  from billing.stripe_payments as p
  where p.id = p_payment_id
$$;

comment on function billing.refunded_cents(text) is
'How much of a payment is refunded: the greater of the cumulative amount charge.refunded '
'reported and the sum of the refunds seen. Each measure alone never over-counts, so a refund '
'described by both event types counts once.';

revoke all on function billing.refunded_cents(text) from public;

create function billing.untaken_tokens(p_payment_id text) returns bigint
language sql stable
set search_path = ''
as $$
  select p.tokens - p.tokens_clawed_back - coalesce((
    select sum(d.tokens_held)
    from billing.stripe_disputes as d
    where d.payment_id = p.id and d.resolution in ('held', 'kept')
  ), 0)::bigint
  from billing.stripe_payments as p
  where p.id = p_payment_id
$$;

comment on function billing.untaken_tokens(text) is
'Tokens of a payment neither clawed back for refunds nor held or kept by its disputes: the most '
'a further refund or dispute may take.';

revoke all on function billing.untaken_tokens(text) from public;

create function billing.claw_back_refunded_tokens(
  p_payment_id text,
  p_event_id text
) returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_payment billing.stripe_payments;
  v_refunded bigint;
  v_target bigint;
  v_debit record;
begin
  -- The caller holds the payment's row lock.
  select p.* into v_payment from billing.stripe_payments as p where p.id = p_payment_id;
  v_refunded := least(billing.refunded_cents(p_payment_id), v_payment.amount_paid_cents);
  v_target := case
    when v_payment.amount_paid_cents > 0
      then floor(v_payment.tokens::numeric * v_refunded / v_payment.amount_paid_cents)::bigint
    else 0
  end;
  -- Tokens a dispute took are not taken twice.
  v_target := least(v_target, v_payment.tokens_clawed_back + billing.untaken_tokens(p_payment_id));

  if v_target <= v_payment.tokens_clawed_back then
    return query select 'applied'::text, format(
      'payment %s: %s of %s cents refunded, no further tokens to claw back (%s already)',
      v_payment.id, v_refunded, v_payment.amount_paid_cents, v_payment.tokens_clawed_back);
    return;
  end if;

  select d.status, d.balance into v_debit
  from billing.debit(
    v_payment.user_id,
    v_target - v_payment.tokens_clawed_back,
    format('stripe:clawback:%s:%s', v_payment.id, v_target),
    'clawback',
    format('Refund of %s (%s of %s cents)', v_payment.id, v_refunded, v_payment.amount_paid_cents),
    jsonb_build_object(
      'stripe_event_id', p_event_id, 'stripe_payment', v_payment.id,
      'refunded_cents', v_refunded, 'tokens_clawed_back', v_target),
    true
  ) as d;

  update billing.stripe_payments as p
  set tokens_clawed_back = v_target, updated_at = now()
  where p.id = v_payment.id;

  return query select
    case when v_debit.status = 'applied' then 'applied' else 'duplicate' end,
    format('payment %s: %s of %s cents refunded, clawed back %s tokens from user %s (balance %s)',
      v_payment.id, v_refunded, v_payment.amount_paid_cents,
      v_target - v_payment.tokens_clawed_back, v_payment.user_id, v_debit.balance);
end;
$$;

comment on function billing.claw_back_refunded_tokens(text, text) is
'Debits (kind clawback, debt allowed) floor(tokens x refunded / paid) of a payment minus what '
'was already clawed back, capped by what its disputes left, keyed on the new cumulative total. '
'Call under the payment''s row lock.';

revoke all on function billing.claw_back_refunded_tokens(text, text) from public;

insert into billing.schema_migrations (version, name) values ('20261121001000', 'stripe_common');
