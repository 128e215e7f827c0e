-- Migration: Stripe refund and dispute events.
--
-- Purpose: refunds claw back the refunded share of a payment's tokens, keyed on the cumulative
-- refunded amount; a dispute debits the disputed share at once and a won one credits it back.
-- Disputes are a debit, not a reservation: the tokens leave the balance immediately, so they can
-- be neither spent nor expired while the dispute is open, and a won dispute is a new credit.
-- See docs/stripe-events.md.
-- Objects: billing.apply_refund_event(), billing.apply_dispute_event().

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

insert into billing.schema_migrations (version, name) values ('20261121001040', 'stripe_refunds_disputes');
