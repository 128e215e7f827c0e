-- Migration: the Stripe event handler.
--
-- Purpose: public.handle_stripe_event() is the whole of the payment logic. The webhook service
-- only verifies the signature and hands the event over; in one transaction the handler stores
-- the event (id unique), decides its effect, applies it through the ledger primitives
-- (billing.credit, billing.debit) and records the outcome. Effects are keyed on the Stripe
-- business object, not on the event id, so two events describing one payment credit it once.
-- Objects: billing.stripe_ref(), billing.stripe_bigint(), billing.require_stripe_event(),
--   billing.require_stripe_object(), billing.invoice_line_price(), billing.resolve_stripe_user(),
--   billing.ensure_account(), billing.sync_account_plan(), billing.lock_stripe_payment(),
--   billing.refunded_cents(), billing.untaken_tokens(), billing.claw_back_refunded_tokens(),
--   billing.apply_checkout_session_event(), billing.apply_invoice_paid_event(),
--   billing.apply_invoice_payment_failed_event(), billing.apply_subscription_event(),
--   billing.apply_refund_event(), billing.apply_dispute_event(), billing.apply_stripe_event(),
--   public.handle_stripe_event(), public.replay_parked_stripe_events().
--
-- Statuses: applied (the effect happened now), duplicate (the event id was handled before, or
-- another event for the same object already had this effect), ignored (nothing to do), stale
-- (older, by Stripe's `created`, than what was already applied to the object: nothing changes),
-- parked (no user, product, payment or subscription to tie it to yet: stored with the reason,
-- replayable).
--
-- Event -> effect ("user" is found in the order given; "account" is opened when missing):
-- | event                      | condition                     | effect (ledger key)                  | status      |
-- |----------------------------|-------------------------------|--------------------------------------|-------------|
-- | checkout.session.          | mode payment;                 | credit pack tokens x quantity, kind  | applied,    |
-- | completed (payment_status  | metadata.product is a pack    | purchase                             | duplicate   |
-- | paid or                    | (active or not: it was paid   | (stripe:checkout:<session>);         |             |
-- | no_payment_required),      | for); metadata.quantity or 1  | remember payment intent, amount and  |             |
-- | .async_payment_succeeded   | (line items are not in the    | tokens for refunds and disputes      |             |
-- |                            | event: the service copies the |                                      |             |
-- |                            | quantity into metadata);      |                                      |             |
-- |                            | user: client_reference_id,    |                                      |             |
-- |                            | metadata.user_id, else the    |                                      |             |
-- |                            | customer link                 |                                      |             |
-- |                            |                               |                                      |             |
-- | same                       | no pack, bad quantity or no   | none                                 | parked      |
-- |                            | user                          |                                      |             |
-- |                            |                               |                                      |             |
-- | checkout.session.completed | payment_status unpaid (a      | none: async_payment_succeeded        | ignored     |
-- |                            | delayed method)               | credits it                           |             |
-- |                            |                               |                                      |             |
-- | checkout.session.          | mode subscription             | link the customer to the user (the   | applied     |
-- | completed,                 |                               | invoices grant the tokens)           |             |
-- | .async_payment_succeeded   |                               |                                      |             |
-- |                            |                               |                                      |             |
-- | same                       | no user                       | none                                 | parked      |
-- |                            |                               |                                      |             |
-- | checkout.session.completed | mode setup                    | none                                 | ignored     |
-- |                            |                               |                                      |             |
-- | checkout.session.          |                               | none                                 | ignored     |
-- | async_payment_failed,      |                               |                                      |             |
-- | .expired                   |                               |                                      |             |
-- |                            |                               |                                      |             |
-- | invoice.paid,              | billing_reason                | credit plan tokens x line quantity,  | applied,    |
-- | invoice.payment_succeeded  | subscription_create or        | kind subscription, expiring at the   | duplicate   |
-- |                            | subscription_cycle; plan: the | line's period end unless the plan    |             |
-- |                            | first line whose price is a   | rolls over                           |             |
-- |                            | plan's (line.price.id before  | (stripe:invoice:<invoice>)           |             |
-- |                            | 2025-03-31, line.pricing.     |                                      |             |
-- |                            | price_details.price after);   |                                      |             |
-- |                            | user: customer link,          |                                      |             |
-- |                            | subscription                  |                                      |             |
-- |                            | metadata.user_id, recorded    |                                      |             |
-- |                            | subscription                  |                                      |             |
-- |                            |                               |                                      |             |
-- | same                       | no plan price or no user      | none                                 | parked      |
-- |                            |                               |                                      |             |
-- | same                       | subscription canceled, or     | none                                 | ignored     |
-- |                            | another billing_reason        |                                      |             |
-- |                            | (manual, subscription_update  |                                      |             |
-- |                            | proration, ...)               |                                      |             |
-- |                            |                               |                                      |             |
-- | invoice.payment_failed     | invoice of a recorded         | subscription past_due (incomplete    | applied,    |
-- |                            | subscription                  | for its first invoice); account      | stale       |
-- |                            |                               | synced                               |             |
-- |                            |                               |                                      |             |
-- | same                       | subscription not recorded     | none                                 | parked;     |
-- |                            | yet; not a subscription's     |                                      | ignored     |
-- |                            | invoice                       |                                      |             |
-- |                            |                               |                                      |             |
-- | customer.subscription.     | not older than the last event | upsert billing.subscriptions         | applied,    |
-- | created, .updated,         | applied to the subscription;  | (deleted: canceled); sync the        | stale       |
-- | .deleted                   | user: metadata.user_id,       | account's plan and status (no        |             |
-- |                            | customer link, recorded       | entitled subscription: free); link   |             |
-- |                            | subscription                  | the customer                         |             |
-- |                            |                               |                                      |             |
-- | same                       | no plan price, unknown status | none                                 | parked      |
-- |                            | or no user                    |                                      |             |
-- |                            |                               |                                      |             |
-- | charge.refunded,           | payment recorded (by payment  | refunded = greatest(cumulative       | applied,    |
-- | refund.created             | intent, else charge); refund  | amount_refunded, sum of the refunds  | duplicate,  |
-- |                            | not failed or canceled        | seen); debit floor(tokens x refunded | stale       |
-- |                            |                               | / paid) minus what was already       |             |
-- |                            |                               | clawed back, kind clawback, debt     |             |
-- |                            |                               | allowed                              |             |
-- |                            |                               | (stripe:clawback:<payment>:<total    |             |
-- |                            |                               | clawed back>)                        |             |
-- |                            |                               |                                      |             |
-- | same                       | payment not recorded          | none                                 | parked      |
-- |                            |                               |                                      |             |
-- | charge.dispute.created     | payment recorded              | debit the disputed share of its      | applied,    |
-- |                            |                               | tokens (at most what refunds and     | duplicate,  |
-- |                            |                               | other disputes left), kind dispute,  | stale       |
-- |                            |                               | debt allowed                         |             |
-- |                            |                               | (stripe:dispute:<dispute>)           |             |
-- |                            |                               |                                      |             |
-- | charge.dispute.created,    | payment not recorded          | none                                 | parked      |
-- | .closed                    |                               |                                      |             |
-- |                            |                               |                                      |             |
-- | charge.dispute.closed      | won, warning_closed, ...      | credit the held tokens back, kind    | applied,    |
-- |                            |                               | dispute_won                          | duplicate,  |
-- |                            |                               | (stripe:dispute:<dispute>:won)       | stale       |
-- |                            |                               |                                      |             |
-- | same                       | lost (if never seen open:     | none: the debit is final             | applied     |
-- |                            | debit it now)                 |                                      |             |
-- |                            |                               |                                      |             |
-- | any other type             |                               | none                                 | ignored     |
-- | (charge.dispute.updated,   |                               |                                      |             |
-- | ...)                       |                               |                                      |             |
-- |                            |                               |                                      |             |
-- | malformed or thin (v2)     |                               | error 22023, nothing stored          | -           |
-- | event                      |                               |                                      |             |
--
-- Disputes are a debit, not a reservation: the tokens leave the balance immediately, so they can
-- be neither spent nor expired while the dispute is open, and a won dispute is a new credit.
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

-- One function per kind of event ----------------------------------------------------------------

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

create function billing.apply_subscription_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_sub jsonb := billing.require_stripe_object(p_event, 'subscription');
  v_subscription_id text := v_sub ->> 'id';
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_customer text := billing.stripe_ref(v_sub -> 'customer');
  v_items jsonb := case
    when jsonb_typeof(v_sub #> '{items,data}') = 'array' then v_sub #> '{items,data}'
    else '[]'
  end;
  v_status text := case
    when p_event ->> 'type' = 'customer.subscription.deleted' then 'canceled'
    else v_sub ->> 'status'
  end;
  v_item jsonb;
  v_code text;
  v_existing billing.subscriptions;
  v_user_id uuid;
  v_problem text;
begin
  if v_status is null or v_status not in (
    'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled', 'unpaid',
    'paused'
  ) then
    return query select 'parked'::text, format('subscription %s: unknown status %s',
      v_subscription_id, coalesce(quote_literal(v_status), 'null'));
    return;
  end if;

  select s.* into v_existing
  from billing.subscriptions as s
  where s.id = v_subscription_id
  for update;
  if found and v_created < v_existing.last_event_created then
    return query select 'stale'::text, format(
      'subscription %s: event of %s is older than the last applied (%s)', v_subscription_id,
      v_created, v_existing.last_event_created);
    return;
  end if;

  select l.item, p.code into v_item, v_code
  from jsonb_array_elements(v_items) with ordinality as l (item, n)
  inner join billing.products as p
    on p.stripe_price_id = coalesce(
      billing.stripe_ref(l.item -> 'price'), billing.stripe_ref(l.item -> 'plan')
    )
    and p.kind = 'plan'
  order by l.n
  limit 1;
  if v_code is null and v_status in ('canceled', 'incomplete_expired') then
    -- An ended subscription keeps its recorded plan: its price may have left the catalog.
    v_code := v_existing.product_code;
  end if;
  if v_code is null then
    return query select 'parked'::text, format(
      'subscription %s: no item''s price is a plan''s stripe_price_id (prices: %s)',
      v_subscription_id,
      coalesce((
        select string_agg(distinct coalesce(
          billing.stripe_ref(l.item -> 'price'), billing.stripe_ref(l.item -> 'plan')), ', ')
        from jsonb_array_elements(v_items) as l (item)
      ), 'none'));
    return;
  end if;

  select r.user_id, r.problem into v_user_id, v_problem
  from billing.resolve_stripe_user(
    array['metadata.user_id'], array[v_sub #>> '{metadata,user_id}'], v_customer,
    v_subscription_id
  ) as r;
  if v_user_id is null then
    return query select 'parked'::text,
      format('subscription %s: %s', v_subscription_id, v_problem);
    return;
  end if;

  perform billing.ensure_account(v_user_id);
  if v_customer is not null then
    perform billing.link_customer(v_customer, v_user_id);
  end if;

  -- The period is on the item from API 2025-03-31 (basil), on the subscription before.
  insert into billing.subscriptions as s (
    id, user_id, stripe_customer_id, product_code, stripe_price_id, status,
    current_period_start, current_period_end, cancel_at_period_end, last_event_id,
    last_event_created
  )
  values (
    v_subscription_id, v_user_id, v_customer, v_code,
    coalesce(billing.stripe_ref(v_item -> 'price'), billing.stripe_ref(v_item -> 'plan')),
    v_status,
    to_timestamp(coalesce(
      billing.stripe_bigint(v_item -> 'current_period_start', 'current_period_start'),
      billing.stripe_bigint(v_sub -> 'current_period_start', 'current_period_start'))),
    to_timestamp(coalesce(
      billing.stripe_bigint(v_item -> 'current_period_end', 'current_period_end'),
      billing.stripe_bigint(v_sub -> 'current_period_end', 'current_period_end'))),
    coalesce(v_sub -> 'cancel_at_period_end' = 'true'::jsonb, false),
    p_event ->> 'id', v_created
  )
  on conflict (id) do update
  set
    stripe_customer_id = coalesce(excluded.stripe_customer_id, s.stripe_customer_id),
    product_code = excluded.product_code,
    stripe_price_id = excluded.stripe_price_id,
    status = excluded.status,
    current_period_start = excluded.current_period_start,
    current_period_end = excluded.current_period_end,
    cancel_at_period_end = excluded.cancel_at_period_end,
    last_event_id = excluded.last_event_id,
    last_event_created = excluded.last_event_created,
    updated_at = now()
  where s.last_event_created <= excluded.last_event_created
  returning s.user_id into v_user_id;

  if not found then
    -- A newer event for this subscription committed while this one waited.
    return query select 'stale'::text, format(
      'subscription %s: a newer event was applied concurrently', v_subscription_id);
    return;
  end if;

  perform billing.sync_account_plan(v_user_id);

  return query select 'applied'::text, format('subscription %s of user %s: %s on plan %s',
    v_subscription_id, v_user_id, v_status, v_code);
end;
$$;

comment on function billing.apply_subscription_event(jsonb) is
'customer.subscription.created / updated / deleted: records the subscription''s plan, status and '
'period unless a newer event was applied (stale), then syncs the account''s plan and status.';

revoke all on function billing.apply_subscription_event(jsonb) from public;

create function billing.apply_refund_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_type text := p_event ->> 'type';
  v_object jsonb;
  v_charge_id text;
  v_payment_intent_id text;
  v_refund_amount bigint;
  v_reported bigint;
  v_payment billing.stripe_payments;
  v_before bigint;
begin
  if v_type = 'charge.refunded' then
    v_object := billing.require_stripe_object(p_event, 'charge');
    v_charge_id := v_object ->> 'id';
    v_reported := billing.stripe_bigint(v_object -> 'amount_refunded', 'amount_refunded');
    if v_reported is null or v_reported < 0 then
      raise exception using
        errcode = '22023',
        message = format('p_event.data.object.amount_refunded of event %s must be a non-negative '
          'integer', p_event ->> 'id');
    end if;
  else
    v_object := billing.require_stripe_object(p_event, 'refund');
    v_charge_id := billing.stripe_ref(v_object -> 'charge');
    v_refund_amount := billing.stripe_bigint(v_object -> 'amount', 'amount');
    if v_refund_amount is null or v_refund_amount <= 0 then
      raise exception using
        errcode = '22023',
        message = format('p_event.data.object.amount of event %s must be a positive integer',
          p_event ->> 'id');
    end if;
    if v_object ->> 'status' in ('failed', 'canceled') then
      return query select 'ignored'::text, format('refund %s is %s: nothing to claw back',
        v_object ->> 'id', v_object ->> 'status');
      return;
    end if;
  end if;
  v_payment_intent_id := billing.stripe_ref(v_object -> 'payment_intent');

  v_payment := billing.lock_stripe_payment(v_payment_intent_id, v_charge_id);
  if v_payment.id is null then
    return query select 'parked'::text, format(
      '%s %s: no recorded payment with payment intent %s or charge %s', v_object ->> 'object',
      v_object ->> 'id', coalesce(v_payment_intent_id, '(none)'), coalesce(v_charge_id, '(none)'));
    return;
  end if;

  -- Learn the charge id: disputes of older API versions name only the charge.
  if v_payment.stripe_charge_id is null and v_charge_id is not null then
    update billing.stripe_payments as p
    set stripe_charge_id = v_charge_id, updated_at = now()
    where p.id = v_payment.id
      and not exists (
        select 1 from billing.stripe_payments as o where o.stripe_charge_id = v_charge_id
      );
  end if;

  v_before := billing.refunded_cents(v_payment.id);

  if v_type = 'charge.refunded' then
    if v_reported < v_payment.refunded_cents then
      return query select 'stale'::text, format(
        'charge %s: reports %s cents refunded, %s were already reported', v_charge_id,
        v_reported, v_payment.refunded_cents);
      return;
    end if;
    update billing.stripe_payments as p
    set refunded_cents = v_reported, updated_at = now()
    where p.id = v_payment.id and p.refunded_cents < v_reported;

    -- Before API 2022-11-15 the charge lists its refunds: count them by id as well.
    insert into billing.stripe_refunds (id, payment_id, amount_cents, status)
    select r.refund ->> 'id', v_payment.id, (r.refund ->> 'amount')::bigint, r.refund ->> 'status'
    from jsonb_array_elements(
      case when jsonb_typeof(v_object #> '{refunds,data}') = 'array'
        then v_object #> '{refunds,data}' else '[]' end
    ) as r (refund)
    where r.refund ->> 'id' ~ '^(re|pyr)_[A-Za-z0-9_]{1,250}$'
      and r.refund ->> 'amount' ~ '^[1-9][0-9]{0,14}$'
    on conflict (id) do nothing;
  else
    insert into billing.stripe_refunds (id, payment_id, amount_cents, status)
    values (v_object ->> 'id', v_payment.id, v_refund_amount, v_object ->> 'status')
    on conflict (id) do nothing;
  end if;

  if billing.refunded_cents(v_payment.id) = v_before then
    return query select 'duplicate'::text, format(
      'payment %s: this refund was already counted (%s of %s cents refunded)', v_payment.id,
      v_before, v_payment.amount_paid_cents);
    return;
  end if;

  return query select * from billing.claw_back_refunded_tokens(v_payment.id, p_event ->> 'id');
end;
$$;

comment on function billing.apply_refund_event(jsonb) is
'charge.refunded (cumulative amount_refunded) and refund.created (one refund): records the '
'refund on its payment and claws back the tokens of the newly refunded share; duplicate when '
'the refund was already counted, stale for an older cumulative amount, parked without payment.';

revoke all on function billing.apply_refund_event(jsonb) from public;

create function billing.apply_dispute_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_dispute jsonb := billing.require_stripe_object(p_event, 'dispute');
  v_dispute_id text := v_dispute ->> 'id';
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_status text := coalesce(v_dispute ->> 'status', 'unknown');
  v_amount bigint := greatest(coalesce(billing.stripe_bigint(v_dispute -> 'amount', 'amount'), 0), 0);
  v_payment billing.stripe_payments;
  v_payment_id text;
  v_existing billing.stripe_disputes;
  v_tokens bigint;
begin
  -- Lock order: the payment, then the dispute, then (through the ledger) the account.
  select d.payment_id into v_payment_id from billing.stripe_disputes as d where d.id = v_dispute_id;
  if v_payment_id is not null then
    select p.* into v_payment from billing.stripe_payments as p where p.id = v_payment_id for update;
  else
    v_payment := billing.lock_stripe_payment(
      billing.stripe_ref(v_dispute -> 'payment_intent'), billing.stripe_ref(v_dispute -> 'charge'));
    if v_payment.id is null then
      return query select 'parked'::text, format(
        'dispute %s: no recorded payment with payment intent %s or charge %s', v_dispute_id,
        coalesce(billing.stripe_ref(v_dispute -> 'payment_intent'), '(none)'),
        coalesce(billing.stripe_ref(v_dispute -> 'charge'), '(none)'));
      return;
    end if;
  end if;
  -- Read under the payment's lock: a concurrent event for this dispute has committed by now.
  select d.* into v_existing from billing.stripe_disputes as d where d.id = v_dispute_id for update;

  if v_existing.id is not null and v_created < v_existing.last_event_created then
    return query select 'stale'::text, format(
      'dispute %s: event of %s is older than the last applied (%s)', v_dispute_id, v_created,
      v_existing.last_event_created);
    return;
  end if;

  if v_existing.id is null then
    -- Opened, or closed before its creation event arrived (then held only if lost).
    v_tokens := case
      when p_event ->> 'type' = 'charge.dispute.created' or v_status = 'lost' then
        least(
          case
            when v_payment.amount_paid_cents > 0 then floor(
              v_payment.tokens::numeric * least(v_amount, v_payment.amount_paid_cents)
              / v_payment.amount_paid_cents
            )::bigint
            else 0
          end,
          greatest(billing.untaken_tokens(v_payment.id), 0)
        )
      else 0
    end;
    insert into billing.stripe_disputes (
      id, payment_id, amount_cents, tokens_held, status, resolution, last_event_created
    )
    values (
      v_dispute_id, v_payment.id, v_amount, v_tokens, v_status,
      case
        when p_event ->> 'type' = 'charge.dispute.created' then 'held'
        when v_status = 'lost' then 'kept'
        else 'returned'
      end,
      v_created
    );
    if v_tokens > 0 then
      perform billing.debit(
        v_payment.user_id, v_tokens, 'stripe:dispute:' || v_dispute_id, 'dispute',
        format('Dispute %s of %s', v_dispute_id, v_payment.id),
        jsonb_build_object(
          'stripe_event_id', p_event ->> 'id', 'stripe_dispute', v_dispute_id,
          'stripe_payment', v_payment.id, 'dispute_cents', v_amount),
        true
      );
    end if;
    return query select 'applied'::text, case
      when p_event ->> 'type' = 'charge.dispute.created' then format(
        'dispute %s of payment %s: %s tokens of user %s held (debited) until it closes',
        v_dispute_id, v_payment.id, v_tokens, v_payment.user_id)
      else format('dispute %s of payment %s closed %s before it was seen open: %s tokens of '
        'user %s debited', v_dispute_id, v_payment.id, v_status, v_tokens, v_payment.user_id)
    end;
    return;
  end if;

  if p_event ->> 'type' = 'charge.dispute.created' or v_existing.resolution <> 'held' then
    return query select 'duplicate'::text, format('dispute %s is already recorded (%s, %s)',
      v_dispute_id, v_existing.status, v_existing.resolution);
    return;
  end if;

  -- Closing an open dispute: lost keeps the debit; any other outcome gives the tokens back.
  if v_status <> 'lost' and v_existing.tokens_held > 0 then
    perform billing.credit(
      v_payment.user_id, v_existing.tokens_held, 'stripe:dispute:' || v_dispute_id || ':won',
      'dispute_won', format('Dispute %s closed %s', v_dispute_id, v_status), null,
      jsonb_build_object(
        'stripe_event_id', p_event ->> 'id', 'stripe_dispute', v_dispute_id,
        'stripe_payment', v_payment.id)
    );
  end if;
  update billing.stripe_disputes as d
  set
    status = v_status,
    resolution = case when v_status = 'lost' then 'kept' else 'returned' end,
    last_event_created = v_created,
    updated_at = now()
  where d.id = v_dispute_id;

  return query select 'applied'::text, case
    when v_status = 'lost' then format('dispute %s lost: the %s tokens of user %s stay debited',
      v_dispute_id, v_existing.tokens_held, v_payment.user_id)
    else format('dispute %s closed %s: %s tokens returned to user %s', v_dispute_id, v_status,
      v_existing.tokens_held, v_payment.user_id)
  end;
end;
$$;

comment on function billing.apply_dispute_event(jsonb) is
'charge.dispute.created debits the disputed share of the payment''s tokens (kind dispute, key '
'stripe:dispute:<dispute>); charge.dispute.closed keeps them when lost and credits them back '
'otherwise (kind dispute_won, key stripe:dispute:<dispute>:won). Stale for older events.';

revoke all on function billing.apply_dispute_event(jsonb) from public;

create function billing.apply_stripe_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_type text := p_event ->> 'type';
begin
  if v_type in (
    'checkout.session.completed', 'checkout.session.async_payment_succeeded',
    'checkout.session.async_payment_failed', 'checkout.session.expired'
  ) then
    return query select * from billing.apply_checkout_session_event(p_event);
  elsif v_type in ('invoice.paid', 'invoice.payment_succeeded') then
    return query select * from billing.apply_invoice_paid_event(p_event);
  elsif v_type = 'invoice.payment_failed' then
    return query select * from billing.apply_invoice_payment_failed_event(p_event);
  elsif v_type in (
    'customer.subscription.created', 'customer.subscription.updated',
    'customer.subscription.deleted'
  ) then
    return query select * from billing.apply_subscription_event(p_event);
  elsif v_type in ('charge.refunded', 'refund.created') then
    return query select * from billing.apply_refund_event(p_event);
  elsif v_type in ('charge.dispute.created', 'charge.dispute.closed') then
    return query select * from billing.apply_dispute_event(p_event);
  else
    return query select 'ignored'::text, format('%s events are not handled', v_type);
  end if;
end;
$$;

comment on function billing.apply_stripe_event(jsonb) is
'Decides and applies the effect of a validated event (the mapping table in its migration) and '
'returns the outcome; the one decision path of handle_stripe_event and of replays.';

revoke all on function billing.apply_stripe_event(jsonb) from public;

-- The RPCs --------------------------------------------------------------------------------------

create function public.handle_stripe_event(
  p_event jsonb
) returns table (status text, detail text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_event_id text;
  v_stored billing.stripe_events;
  v_payload jsonb := p_event;
  v_attempts integer := 1;
  v_status text;
  v_detail text;
  v_sqlstate text;
  v_message text;
begin
  perform billing.require_stripe_event(p_event);
  v_event_id := p_event ->> 'id';

  -- The insert is the exactly-once gate: a concurrent delivery of the same event waits here
  -- until this transaction ends, then finds the row.
  insert into billing.stripe_events (id, type, api_version, created, livemode, payload)
  values (
    v_event_id, p_event ->> 'type', p_event ->> 'api_version',
    to_timestamp(billing.stripe_bigint(p_event -> 'created', 'p_event.created')),
    coalesce((p_event ->> 'livemode')::boolean, false), p_event
  )
  on conflict (id) do nothing;

  if not found then
    select e.* into v_stored from billing.stripe_events as e where e.id = v_event_id for update;
    if v_stored.status <> 'parked' then
      return query select 'duplicate'::text, format('event %s was already handled: %s (%s)',
        v_event_id, v_stored.status, v_stored.detail);
      return;
    end if;
    -- A parked event is tried again on every delivery, from the payload first stored.
    v_payload := v_stored.payload;
    v_attempts := v_stored.attempts + 1;
  end if;

  begin
    select a.status, a.detail into v_status, v_detail from billing.apply_stripe_event(v_payload) as a;
  exception when data_exception or check_violation or not_null_violation then
    -- A value the records cannot hold (an object id of the wrong shape, a date out of range):
    -- the event is malformed, like the ones require_stripe_event refuses, and so is refused
    -- the same way (22023, nothing stored) rather than failing as an internal error.
    get stacked diagnostics v_sqlstate = returned_sqlstate, v_message = message_text;
    if v_sqlstate = '22023' then
      raise;
    end if;
    raise exception using
      errcode = '22023',
      message = format('p_event %s cannot be applied: %s (%s)', v_event_id, v_message, v_sqlstate);
  end;

  update billing.stripe_events as e
  set status = v_status, detail = v_detail, attempts = v_attempts, processed_at = now()
  where e.id = v_event_id;

  return query select v_status, v_detail;
end;
$$;

comment on function public.handle_stripe_event(jsonb) is
'Handles one Stripe (v1 snapshot) event exactly once: stores it and applies its effect in one '
'transaction. Statuses: applied, duplicate, ignored, stale, parked (redelivery retries a parked '
'event). Raises 22023, storing nothing, for a malformed or thin event.';

revoke all on function public.handle_stripe_event(jsonb) from public, anon, authenticated;
grant execute on function public.handle_stripe_event(jsonb) to service_role;

create function public.replay_parked_stripe_events()
returns table (event_id text, type text, status text, detail text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_event billing.stripe_events;
  v_status text;
  v_detail text;
  v_sqlstate text;
  v_message text;
begin
  -- One replay at a time; events run oldest first, so a subscription's events keep their order.
  perform pg_catalog.pg_advisory_xact_lock(
    pg_catalog.hashtext('token-billing:replay_parked_stripe_events'));

  for v_event in
    select e.*
    from billing.stripe_events as e
    where e.status = 'parked'
    order by e.created, e.received_at, e.id
  loop
    -- Lock it; a concurrent redelivery may have resolved it meanwhile.
    perform 1 from billing.stripe_events as e
    where e.id = v_event.id and e.status = 'parked'
    for update;
    if not found then
      continue;
    end if;

    begin
      select a.status, a.detail into v_status, v_detail
      from billing.apply_stripe_event(v_event.payload) as a;
    exception when others then
      -- One broken event must not block the others: it stays parked with the error.
      get stacked diagnostics v_sqlstate = returned_sqlstate, v_message = message_text;
      v_status := 'parked';
      v_detail := format('replay failed: %s %s', v_sqlstate, v_message);
    end;

    update billing.stripe_events as e
    set status = v_status, detail = v_detail, attempts = e.attempts + 1, processed_at = now()
    where e.id = v_event.id;

    event_id := v_event.id;
    type := v_event.type;
    status := v_status;
    detail := v_detail;
    return next;
  end loop;
end;
$$;

comment on function public.replay_parked_stripe_events() is
'Re-runs every parked event, oldest first, through the same decision code as '
'handle_stripe_event (e.g. after link_stripe_customer or a catalog fix); returns one row per '
'event with its new status. An event that fails stays parked with the error in its detail.';

revoke all on function public.replay_parked_stripe_events() from public, anon, authenticated;
grant execute on function public.replay_parked_stripe_events() to service_role;
