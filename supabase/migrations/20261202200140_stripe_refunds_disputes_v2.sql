-- Migration: Stripe refunds as a lifecycle, disputes by their latest state.
--
-- Purpose: refund.created, refund.updated, refund.failed, charge.refund.updated and
-- charge.refunded record each refund's latest status (by Stripe's created; within one second a
-- final status wins over pending) and move the tokens clawed back to the refunded share: a
-- refund that fails or is canceled gives back exactly what it clawed (kind clawback_reversed).
-- Disputes hold the disputed share while funds are withdrawn (needs_response, under_review) and
-- keep it when lost; inquiries (warning_needs_response, warning_under_review, warning_closed:
-- no funds withdrawn) hold nothing, so a refund during an inquiry claws back in full and the
-- inquiry's close changes nothing. When a dispute gives tokens back, refunds are reconciled,
-- so after any mix of refunds and dispute outcomes the user keeps the tokens of what was paid
-- and neither refunded nor lost. See docs/stripe-events.md.
-- Objects: billing.refund_status_rank(), billing.apply_refund_event(),
--   billing.dispute_status_rank(), billing.apply_dispute_event().

create function billing.refund_status_rank(p_status text) returns integer
language sql immutable
set search_path = ''
as $$
  select case
    when p_status in ('succeeded', 'failed', 'canceled') then 2
    when p_status = 'requires_action' then 1
    else 0
  end
$$;

comment on function billing.refund_status_rank(text) is
'Order of refund statuses within one second: pending 0, requires_action 1, succeeded, failed and '
'canceled 2 (final).';

revoke all on function billing.refund_status_rank(text) from public;

create or replace function billing.apply_refund_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_type text := p_event ->> 'type';
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_object jsonb;
  v_charge_id text;
  v_payment_intent_id text;
  v_refund_amount bigint;
  v_reported bigint;
  v_payment billing.stripe_payments;
  v_refund billing.stripe_refunds;
  v_before bigint;
  v_stale boolean := false;
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
  end if;
  v_payment_intent_id := billing.stripe_ref(v_object -> 'payment_intent');

  v_payment := billing.lock_stripe_payment(v_payment_intent_id, v_charge_id);
  if v_payment.id is null then
    -- Whoever records this payment holds these until it commits: look again after them.
    perform billing.lock_stripe_refs(array[v_payment_intent_id, v_charge_id]);
    v_payment := billing.lock_stripe_payment(v_payment_intent_id, v_charge_id);
  end if;
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
    if v_payment.refunded_reported_at is not null and v_created < v_payment.refunded_reported_at then
      v_stale := true;
    else
      update billing.stripe_payments as p
      set refunded_cents = v_reported, refunded_reported_at = v_created, updated_at = now()
      where p.id = v_payment.id;
    end if;

    -- Before API 2022-11-15 the charge lists its refunds: count them by id as well.
    insert into billing.stripe_refunds as r (
      id, payment_id, amount_cents, status, last_event_created
    )
    select r.refund ->> 'id', v_payment.id, (r.refund ->> 'amount')::bigint, r.refund ->> 'status',
      v_created
    from jsonb_array_elements(
      case when jsonb_typeof(v_object #> '{refunds,data}') = 'array'
        then v_object #> '{refunds,data}' else '[]' end
    ) as r (refund)
    where r.refund ->> 'id' ~ '^(re|pyr)_[A-Za-z0-9_]{1,250}$'
      and r.refund ->> 'amount' ~ '^[1-9][0-9]{0,14}$'
    on conflict (id) do update
    set status = excluded.status, last_event_created = excluded.last_event_created,
      updated_at = now()
    where r.last_event_created is null or r.last_event_created < excluded.last_event_created
      or (r.last_event_created = excluded.last_event_created
        and billing.refund_status_rank(excluded.status) > billing.refund_status_rank(r.status));
  else
    select r.* into v_refund from billing.stripe_refunds as r where r.id = v_object ->> 'id';
    if v_refund.id is not null and v_refund.last_event_created is not null and (
      v_created < v_refund.last_event_created
      or (v_created = v_refund.last_event_created
        and billing.refund_status_rank(v_object ->> 'status')
          <= billing.refund_status_rank(v_refund.status))) then
      v_stale := v_refund.status is distinct from v_object ->> 'status';
    end if;
    insert into billing.stripe_refunds as r (
      id, payment_id, amount_cents, status, last_event_created
    )
    values (v_object ->> 'id', v_payment.id, v_refund_amount, v_object ->> 'status', v_created)
    on conflict (id) do update
    set status = excluded.status, last_event_created = excluded.last_event_created,
      updated_at = now()
    where r.last_event_created is null or r.last_event_created < excluded.last_event_created
      or (r.last_event_created = excluded.last_event_created
        and billing.refund_status_rank(excluded.status) > billing.refund_status_rank(r.status));
  end if;

  if billing.refunded_cents(v_payment.id) = v_before then
    if v_stale and v_type = 'charge.refunded' then
      return query select 'stale'::text, format(
        'charge %s: reports %s cents refunded, %s were already reported', v_charge_id,
        v_reported, v_payment.refunded_cents);
      return;
    end if;
    if not v_stale and v_type <> 'charge.refunded' and v_object ->> 'status' in ('failed', 'canceled') then
      return query select 'ignored'::text, format(
        'refund %s is %s: nothing was clawed back for it, nothing to give back',
        v_object ->> 'id', v_object ->> 'status');
      return;
    end if;
    return query select case when v_stale then 'stale' else 'duplicate' end::text, format(
      'payment %s: %s changes nothing (%s of %s cents refunded)', v_payment.id,
      case when v_stale then 'this older refund state' else 'this refund state' end,
      v_before, v_payment.amount_paid_cents);
    return;
  end if;

  return query select * from billing.claw_back_refunded_tokens(v_payment.id, p_event ->> 'id');
end;
$$;

comment on function billing.apply_refund_event(jsonb) is
'charge.refunded (cumulative amount_refunded, refunds listed before API 2022-11-15), '
'refund.created / updated / failed and charge.refund.updated (one refund): records each refund''s '
'latest status and moves the tokens clawed back to the refunded share (a failed or canceled '
'refund gives them back); duplicate or stale when nothing changes, parked without payment.';

create function billing.dispute_status_rank(p_status text) returns integer
language sql immutable
set search_path = ''
as $$
  select case
    when p_status in ('won', 'lost', 'warning_closed', 'prevented', 'charge_refunded') then 2
    when p_status in ('needs_response', 'under_review') then 1
    else 0
  end
$$;

comment on function billing.dispute_status_rank(text) is
'Order of dispute statuses within one second: inquiries 0, open with funds withdrawn 1, closed 2.';

revoke all on function billing.dispute_status_rank(text) from public;

create or replace function billing.apply_dispute_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_type text := p_event ->> 'type';
  v_dispute jsonb := billing.require_stripe_object(p_event, 'dispute');
  v_dispute_id text := v_dispute ->> 'id';
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_status text := coalesce(v_dispute ->> 'status', 'unknown');
  v_amount bigint := greatest(coalesce(billing.stripe_bigint(v_dispute -> 'amount', 'amount'), 0), 0);
  v_payment billing.stripe_payments;
  v_payment_id text;
  v_existing billing.stripe_disputes;
  v_holds boolean;
  v_share bigint;
  v_hold bigint;
  v_step integer;
  v_resolution text;
  v_detail text;
begin
  -- Lock order: the payment, then the dispute, then (through the ledger) the account.
  select d.payment_id into v_payment_id from billing.stripe_disputes as d where d.id = v_dispute_id;
  if v_payment_id is not null then
    select p.* into v_payment from billing.stripe_payments as p where p.id = v_payment_id for update;
  else
    v_payment := billing.lock_stripe_payment(
      billing.stripe_ref(v_dispute -> 'payment_intent'), billing.stripe_ref(v_dispute -> 'charge'));
    if v_payment.id is null then
      -- Whoever records this payment holds these until it commits: look again after them.
      perform billing.lock_stripe_refs(array[
        billing.stripe_ref(v_dispute -> 'payment_intent'), billing.stripe_ref(v_dispute -> 'charge')]);
      v_payment := billing.lock_stripe_payment(
        billing.stripe_ref(v_dispute -> 'payment_intent'), billing.stripe_ref(v_dispute -> 'charge'));
    end if;
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

  if v_existing.id is not null and (
    v_created < v_existing.last_event_created
    or (v_created = v_existing.last_event_created
      and billing.dispute_status_rank(v_status) < billing.dispute_status_rank(v_existing.status))
    or (billing.dispute_status_rank(v_existing.status) = 2
      and billing.dispute_status_rank(v_status) < 2)
  ) then
    return query select 'stale'::text, format(
      'dispute %s: event of %s (%s) is older than the last applied (%s, %s)', v_dispute_id,
      v_created, v_status, v_existing.last_event_created, v_existing.status);
    return;
  end if;

  -- What the dispute should hold now: its share while funds are withdrawn or when lost.
  v_holds := case
    when v_type = 'charge.dispute.funds_reinstated' then false
    when v_type = 'charge.dispute.funds_withdrawn' then v_status not in ('won', 'warning_closed')
    else v_status in ('needs_response', 'under_review', 'lost')
  end;
  -- Rounding: the disputed share of the tokens, rounded down.
  v_share := case
    when v_payment.amount_paid_cents > 0 then floor(
      v_payment.tokens::numeric * least(v_amount, v_payment.amount_paid_cents)
      / v_payment.amount_paid_cents)::bigint
    else 0
  end;
  v_hold := case
    when v_holds then least(
      v_share,
      coalesce(v_existing.tokens_held, 0) + greatest(billing.untaken_tokens(v_payment.id), 0))
    else 0
  end;
  v_resolution := case
    when v_status = 'lost' then 'kept'
    when billing.dispute_status_rank(v_status) = 2 then 'returned'
    else 'held'
  end;

  if v_existing.id is null then
    insert into billing.stripe_disputes (
      id, payment_id, amount_cents, tokens_held, status, resolution, last_event_created
    )
    values (v_dispute_id, v_payment.id, v_amount, 0, v_status, 'held', v_created)
    returning * into v_existing;
  elsif (v_existing.status, v_existing.tokens_held) is not distinct from (v_status, v_hold) then
    update billing.stripe_disputes as d
    set last_event_created = v_created, updated_at = now()
    where d.id = v_dispute_id;
    return query select 'duplicate'::text, format('dispute %s is already %s (%s tokens held)',
      v_dispute_id, v_status, v_hold);
    return;
  end if;

  v_step := v_existing.adjustments + 1;
  if v_hold > v_existing.tokens_held then
    perform billing.debit(
      v_payment.user_id, v_hold - v_existing.tokens_held,
      format('stripe:dispute:%s:n%s', v_dispute_id, v_step), 'dispute',
      format('Dispute %s of %s (%s)', v_dispute_id, v_payment.id, v_status),
      jsonb_build_object(
        'stripe_event_id', p_event ->> 'id', 'stripe_dispute', v_dispute_id,
        'stripe_payment', v_payment.id, 'dispute_cents', v_amount),
      true
    );
  elsif v_hold < v_existing.tokens_held then
    perform billing.credit(
      v_payment.user_id, v_existing.tokens_held - v_hold,
      format('stripe:dispute:%s:n%s', v_dispute_id, v_step), 'dispute_won',
      format('Dispute %s of %s: %s', v_dispute_id, v_payment.id, v_status), null,
      jsonb_build_object(
        'stripe_event_id', p_event ->> 'id', 'stripe_dispute', v_dispute_id,
        'stripe_payment', v_payment.id)
    );
  end if;

  update billing.stripe_disputes as d
  set
    amount_cents = v_amount,
    tokens_held = v_hold,
    status = v_status,
    resolution = v_resolution,
    adjustments = d.adjustments + case when v_hold <> v_existing.tokens_held then 1 else 0 end,
    last_event_created = v_created,
    updated_at = now()
  where d.id = v_dispute_id;

  v_detail := case
    when v_status = 'lost' then format('dispute %s lost: the %s tokens of user %s stay debited',
      v_dispute_id, v_hold, v_payment.user_id)
    when billing.dispute_status_rank(v_status) = 2 then format(
      'dispute %s closed %s: %s tokens returned to user %s', v_dispute_id, v_status,
      v_existing.tokens_held - v_hold, v_payment.user_id)
    when v_hold > v_existing.tokens_held then format(
      'dispute %s of payment %s: %s tokens of user %s held (debited) until it closes',
      v_dispute_id, v_payment.id, v_hold, v_payment.user_id)
    else format('dispute %s of payment %s is %s: %s tokens of user %s held (%s before)%s',
      v_dispute_id, v_payment.id, v_status, v_hold, v_payment.user_id, v_existing.tokens_held,
      case when billing.dispute_status_rank(v_status) = 0
        then ' (an inquiry: no funds withdrawn, nothing held)' else '' end)
  end;
  if v_hold < v_existing.tokens_held then
    -- Tokens came back: refunds a dispute's hold capped may take their share now.
    perform billing.claw_back_refunded_tokens(v_payment.id, p_event ->> 'id');
  end if;
  return query select 'applied'::text, v_detail;
end;
$$;

comment on function billing.apply_dispute_event(jsonb) is
'charge.dispute.created / updated / closed / funds_withdrawn / funds_reinstated: moves the '
'dispute''s hold to the disputed share of the payment''s tokens while funds are withdrawn or when '
'lost (a debit, kind dispute) and to 0 otherwise (a credit, kind dispute_won), keyed '
'stripe:dispute:<dispute>:n<k>; inquiries hold nothing. Stale for older events.';

insert into billing.schema_migrations (version, name) values ('20261202200140', 'stripe_refunds_disputes_v2');
