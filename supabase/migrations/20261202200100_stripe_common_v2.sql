-- Migration: the Stripe handler's shared helpers, second version.
--
-- Purpose: the account's plan computed under the account's lock (two subscriptions of one user
-- changing at once end in the right plan); refunds counted by their latest status, so a failed
-- or canceled refund gives back what it clawed (kind clawback_reversed); parked events applied in
-- the same transaction as the event that makes their object appear. What each event does is in
-- docs/stripe-events.md.
-- Objects: billing.subscription_status_rank(), billing.sync_account_plan(),
--   billing.refunded_cents(), billing.claw_back_refunded_tokens(), billing.lock_stripe_refs(),
--   billing.stripe_event_refs(),
--   billing.heal_parked_stripe_events(), public.link_stripe_customer().
--
-- Lock order (no deadlocks) stays the one of 20261121001000_stripe_common.sql: the event row
-- first, then the rows of one Stripe object, the account last. sync_account_plan locks the
-- account before reading the user's subscriptions, so a concurrent change of another of them
-- has committed (and is seen) by the time the plan is computed. Healing runs after the event's
-- own effect and skips parked events another transaction is handling (skip locked).

create function billing.subscription_status_rank(p_status text) returns integer
language sql immutable
set search_path = ''
as $$
  select case p_status
    when 'incomplete' then 0
    when 'trialing' then 1
    when 'active' then 2
    when 'past_due' then 2
    when 'unpaid' then 2
    when 'paused' then 2
    when 'incomplete_expired' then 3
    when 'canceled' then 3
    else 0
  end
$$;

comment on function billing.subscription_status_rank(text) is
'How far along its life a subscription status is (incomplete 0, trialing 1, active, past_due, '
'unpaid, paused 2, canceled and incomplete_expired 3): of two events of one subscription with '
'the same created second, the one further along wins, whatever the delivery order.';

revoke all on function billing.subscription_status_rank(text) from public;

create or replace function billing.sync_account_plan(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_plan text;
  v_status text;
begin
  -- The account first: a concurrent event of another subscription of this user holds this lock
  -- until it commits, so the read below sees its subscription row.
  perform 1 from billing.accounts as a where a.user_id = p_user_id for update;

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
'Sets accounts.plan and subscription_status from the user''s subscriptions, under the account''s '
'lock: the newest entitled one (active, trialing, past_due) gives its plan; otherwise the plan is '
'free with the newest subscription''s status (canceled, paused, unpaid, incomplete, ...). No '
'change without subscriptions.';

create or replace function billing.refunded_cents(p_payment_id text) returns bigint
language sql stable
set search_path = ''
as $$
  select greatest(
    coalesce((
      select sum(r.amount_cents)
      from billing.stripe_refunds as r
      where r.payment_id = p.id and coalesce(r.status, '') not in ('failed', 'canceled')
    ), 0),
    p.refunded_cents - coalesce((
      select sum(r.amount_cents)
      from billing.stripe_refunds as r
      where r.payment_id = p.id and r.status in ('failed', 'canceled')
        and r.last_event_created > p.refunded_reported_at
    ), 0)
  )::bigint
  from billing.stripe_payments as p
  where p.id = p_payment_id
$$;

comment on function billing.refunded_cents(text) is
'How much of a payment is refunded now: the greater of the refunds seen that did not fail or '
'get canceled, and the latest cumulative amount_refunded charge.refunded reported less the '
'refunds that failed after that report. Each measure alone never over-counts, so a refund '
'described by both event types counts once, and a failed one stops counting.';

create or replace function billing.claw_back_refunded_tokens(
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
  v_entry record;
begin
  -- The caller holds the payment's row lock.
  select p.* into v_payment from billing.stripe_payments as p where p.id = p_payment_id;
  v_refunded := least(billing.refunded_cents(p_payment_id), v_payment.amount_paid_cents);
  -- Rounding: the refunded share of the tokens, rounded down (the user keeps the fraction).
  v_target := case
    when v_payment.amount_paid_cents > 0
      then floor(v_payment.tokens::numeric * v_refunded / v_payment.amount_paid_cents)::bigint
    else 0
  end;
  -- Tokens a dispute took are not taken twice.
  v_target := least(v_target, v_payment.tokens_clawed_back + billing.untaken_tokens(p_payment_id));

  if v_target = v_payment.tokens_clawed_back then
    return query select 'applied'::text, format(
      'payment %s: %s of %s cents refunded, no tokens to claw back or give back (%s clawed back)',
      v_payment.id, v_refunded, v_payment.amount_paid_cents, v_payment.tokens_clawed_back);
    return;
  end if;

  if v_target > v_payment.tokens_clawed_back then
    select d.status, d.balance into v_entry
    from billing.debit(
      v_payment.user_id,
      v_target - v_payment.tokens_clawed_back,
      format('stripe:clawback:%s:n%s', v_payment.id, v_payment.adjustments + 1),
      'clawback',
      format('Refund of %s (%s of %s cents)', v_payment.id, v_refunded, v_payment.amount_paid_cents),
      jsonb_build_object(
        'stripe_event_id', p_event_id, 'stripe_payment', v_payment.id,
        'refunded_cents', v_refunded, 'tokens_clawed_back', v_target),
      true
    ) as d;
  else
    -- A refund failed or was canceled: exactly what it clawed comes back, as an entry of its own.
    select c.status, c.balance into v_entry
    from billing.credit(
      v_payment.user_id,
      v_payment.tokens_clawed_back - v_target,
      format('stripe:clawback:%s:n%s', v_payment.id, v_payment.adjustments + 1),
      'clawback_reversed',
      format('Refund of %s failed or canceled (%s of %s cents refunded now)', v_payment.id,
        v_refunded, v_payment.amount_paid_cents),
      null,
      jsonb_build_object(
        'stripe_event_id', p_event_id, 'stripe_payment', v_payment.id,
        'refunded_cents', v_refunded, 'tokens_clawed_back', v_target)
    ) as c;
  end if;

  update billing.stripe_payments as p
  set tokens_clawed_back = v_target, adjustments = p.adjustments + 1, updated_at = now()
  where p.id = v_payment.id;

  return query select 'applied'::text, format(
    'payment %s: %s of %s cents refunded, %s %s tokens %s user %s (balance %s)',
    v_payment.id, v_refunded, v_payment.amount_paid_cents,
    case when v_target > v_payment.tokens_clawed_back then 'clawed back' else 'gave back' end,
    abs(v_target - v_payment.tokens_clawed_back),
    case when v_target > v_payment.tokens_clawed_back then 'from' else 'to' end,
    v_payment.user_id, v_entry.balance);
end;
$$;

comment on function billing.claw_back_refunded_tokens(text, text) is
'Moves the tokens clawed back for refunds to floor(tokens x refunded / paid), capped by what its '
'disputes left: a debit (kind clawback, debt allowed) when more is refunded, a credit (kind '
'clawback_reversed) when a refund failed or was canceled; keyed stripe:clawback:<payment>:n<k>. '
'Call under the payment''s row lock.';

-- Parked events that heal -----------------------------------------------------------------------

create function billing.lock_stripe_refs(p_refs text[]) returns void
language sql
set search_path = ''
as $$
  select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('token-billing:stripe:' || r.ref))
  from (select distinct u.ref from unnest(p_refs) as u (ref) where u.ref is not null) as r
  order by r.ref
$$;

comment on function billing.lock_stripe_refs(text[]) is
'Transaction advisory locks on Stripe ids (payment intents, charges), taken in sorted order by '
'whoever records a payment and by a refund or dispute that finds none: the one that parks then '
'commits before the payment is recorded, and the recording transaction sees it parked and heals '
'it; or it waits and finds the payment.';

revoke all on function billing.lock_stripe_refs(text[]) from public;

create function billing.stripe_event_refs(p_event jsonb) returns text[]
language sql immutable
set search_path = ''
as $$
  select coalesce(array_agg(distinct r.ref) filter (where r.ref is not null), '{}')
  from (
    select unnest(array[
      o ->> 'id',
      billing.stripe_ref(o -> 'customer'),
      billing.stripe_ref(o -> 'subscription'),
      o #>> '{parent,subscription_details,subscription}',
      billing.stripe_ref(o -> 'invoice'),
      billing.stripe_ref(o -> 'payment_intent'),
      billing.stripe_ref(o -> 'charge'),
      billing.stripe_ref(o #> '{payment,payment_intent}'),
      billing.stripe_ref(o #> '{payment,charge}')
    ]) as ref
    from (select p_event #> '{data,object}' as o) as x
  ) as r
$$;

comment on function billing.stripe_event_refs(jsonb) is
'The Stripe ids an event''s object names: itself, its customer, subscription, invoice, payment '
'intent and charge. A parked event waits for these; an applied one makes them appear.';

revoke all on function billing.stripe_event_refs(jsonb) from public;

create function billing.heal_parked_stripe_events(
  p_refs text[],
  p_except_event_id text default null
) returns integer
language plpgsql
set search_path = ''
as $$
declare
  v_refs text[] := p_refs;
  v_done text[] := array[coalesce(p_except_event_id, '')];
  v_event billing.stripe_events;
  v_status text;
  v_detail text;
  v_healed integer := 0;
begin
  if coalesce(cardinality(v_refs), 0) = 0 then
    return 0;
  end if;
  loop
    -- Oldest first, so an object's events keep their order; one another transaction is handling
    -- (a redelivery, a replay) is left to it.
    select e.* into v_event
    from billing.stripe_events as e
    where e.status = 'parked' and e.waiting_for && v_refs and e.id <> all (v_done)
    order by e.created, e.received_at, e.id
    limit 1
    for update skip locked;
    exit when not found or cardinality(v_done) > 100;
    v_done := v_done || v_event.id;

    begin
      select a.status, a.detail into v_status, v_detail
      from billing.apply_stripe_event(v_event.payload) as a;
    exception when others then
      -- A broken event stays parked and must not undo the event that healed the others.
      get stacked diagnostics v_detail = message_text;
      v_status := 'parked';
      v_detail := format('healing failed: %s', v_detail);
    end;

    update billing.stripe_events as e
    set
      status = v_status,
      detail = v_detail,
      attempts = e.attempts + 1,
      processed_at = now(),
      waiting_for = case when v_status = 'parked' then e.waiting_for end
    where e.id = v_event.id;
    if v_status <> 'parked' then
      v_healed := v_healed + 1;
      v_refs := v_refs || billing.stripe_event_refs(v_event.payload);
    end if;
  end loop;
  return v_healed;
end;
$$;

comment on function billing.heal_parked_stripe_events(text[], text) is
'Applies, in this transaction and oldest first, the parked events that name any of p_refs (and '
'then those naming what they made appear); returns how many left parked. An event that fails '
'stays parked with the error; one another transaction holds is left to it.';

revoke all on function billing.heal_parked_stripe_events(text[], text) from public;

-- Events parked before this version wait for what they name.
update billing.stripe_events as e
set waiting_for = billing.stripe_event_refs(e.payload)
where e.status = 'parked';

create or replace function public.link_stripe_customer(
  p_user_id uuid,
  p_stripe_customer_id text
) returns table (status text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_owner uuid;
begin
  if p_user_id is null then
    raise exception using errcode = '22023', message = 'p_user_id must not be null';
  end if;
  if p_stripe_customer_id is null or p_stripe_customer_id !~ '^cus_[A-Za-z0-9]{1,250}$' then
    raise exception using
      errcode = '22023',
      message = format('p_stripe_customer_id must be a Stripe customer id (cus_...), got %s',
        coalesce(quote_literal(p_stripe_customer_id), 'null'));
  end if;

  -- The user of a customer gets an account (the signup grant) the moment it is known.
  if not exists (select 1 from billing.accounts as a where a.user_id = p_user_id) then
    perform billing.open_account(p_user_id);
  end if;

  insert into billing.customers (stripe_customer_id, user_id)
  values (p_stripe_customer_id, p_user_id)
  on conflict (stripe_customer_id) do nothing;
  if found then
    -- Events parked for want of this link apply now.
    perform billing.heal_parked_stripe_events(array[p_stripe_customer_id]);
    return query select 'applied'::text;
    return;
  end if;

  select c.user_id into v_owner
  from billing.customers as c
  where c.stripe_customer_id = p_stripe_customer_id;
  if v_owner <> p_user_id then
    raise exception using
      errcode = 'TBCUS',
      message = format('Stripe customer %s is already linked to user %s, not %s',
        p_stripe_customer_id, v_owner, p_user_id),
      hint = 'A Stripe customer belongs to one user for good: create a new customer instead.';
  end if;
  return query select 'duplicate'::text;
end;
$$;

comment on function public.link_stripe_customer(uuid, text) is
'Records that a Stripe customer belongs to a user (call it when creating the customer, before '
'any checkout), opening the user''s account if missing, and applies the events parked for want '
'of the link. Statuses: applied, duplicate. 22023 on invalid arguments; TBCUS if the customer '
'belongs to another user.';

insert into billing.schema_migrations (version, name) values ('20261202200100', 'stripe_common_v2');
