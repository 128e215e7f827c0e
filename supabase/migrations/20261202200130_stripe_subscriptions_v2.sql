-- Migration: Stripe subscription and customer events, right in every delivery order.
--
-- Purpose: customer.subscription.created, .updated, .deleted, .paused and .resumed keep
-- billing.subscriptions and the account's plan and status. Of two events of one subscription the
-- later by Stripe's created wins; within the same second, the one further along the
-- subscription's life (billing.subscription_status_rank), then the later period end, so the
-- final state does not depend on the delivery order. A paused subscription (status paused, or
-- collection paused) counts as not subscribed. customer.deleted unlinks the customer. See
-- docs/stripe-events.md.
-- Objects: billing.apply_subscription_event(), billing.apply_customer_deleted_event().

create or replace function billing.apply_subscription_event(p_event jsonb)
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
    when v_sub ->> 'status' in ('active', 'trialing', 'past_due')
      and jsonb_typeof(v_sub -> 'pause_collection') = 'object' then 'paused'
    else v_sub ->> 'status'
  end;
  v_item jsonb;
  v_code text;
  v_existing billing.subscriptions;
  v_user_id uuid;
  v_problem text;
  v_period_start timestamptz;
  v_period_end timestamptz;
begin
  if v_status is null or v_status not in (
    'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled', 'unpaid',
    'paused'
  ) then
    return query select 'parked'::text, format('subscription %s: unknown status %s',
      v_subscription_id, coalesce(quote_literal(v_status), 'null'));
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

  -- The period is on the item from API 2025-03-31 (basil), on the subscription before.
  v_period_start := to_timestamp(coalesce(
    billing.stripe_bigint(v_item -> 'current_period_start', 'current_period_start'),
    billing.stripe_bigint(v_sub -> 'current_period_start', 'current_period_start')));
  v_period_end := to_timestamp(coalesce(
    billing.stripe_bigint(v_item -> 'current_period_end', 'current_period_end'),
    billing.stripe_bigint(v_sub -> 'current_period_end', 'current_period_end')));

  select s.* into v_existing
  from billing.subscriptions as s
  where s.id = v_subscription_id
  for update;
  if found and (
    v_created < v_existing.last_event_created
    or (v_created = v_existing.last_event_created
      and (billing.subscription_status_rank(v_status), coalesce(v_period_end, '-infinity'))
        < (billing.subscription_status_rank(v_existing.status),
          coalesce(v_existing.current_period_end, '-infinity')))
  ) then
    return query select 'stale'::text, format(
      'subscription %s: event of %s is older than the last applied (%s)%s', v_subscription_id,
      v_created, v_existing.last_event_created,
      case when v_created = v_existing.last_event_created then format(
        ': same second, and %s is not further along than %s', v_status, v_existing.status)
        else '' end);
    return;
  end if;

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

  if v_existing.id is not null then
    v_user_id := v_existing.user_id;
  else
    select r.user_id, r.problem into v_user_id, v_problem
    from billing.resolve_stripe_user(
      array['metadata.user_id'], array[v_sub #>> '{metadata,user_id}'], v_customer,
      v_subscription_id, true
    ) as r;
  end if;
  if v_user_id is null then
    return query select 'parked'::text,
      format('subscription %s: %s', v_subscription_id, v_problem);
    return;
  end if;

  perform billing.ensure_account(v_user_id);
  if v_customer is not null and billing.link_customer(v_customer, v_user_id) <> v_user_id then
    return query select 'ignored'::text, format(
      'subscription %s: customer %s belongs to another user than %s; not recorded',
      v_subscription_id, v_customer, v_user_id);
    return;
  end if;

  insert into billing.subscriptions as s (
    id, user_id, stripe_customer_id, product_code, stripe_price_id, status,
    current_period_start, current_period_end, cancel_at_period_end, last_event_id,
    last_event_created
  )
  values (
    v_subscription_id, v_user_id, v_customer, v_code,
    coalesce(billing.stripe_ref(v_item -> 'price'), billing.stripe_ref(v_item -> 'plan')),
    v_status, v_period_start, v_period_end,
    coalesce(v_sub -> 'cancel_at_period_end' = 'true'::jsonb, false),
    p_event ->> 'id', v_created
  )
  on conflict (id) do update
  set
    stripe_customer_id = coalesce(excluded.stripe_customer_id, s.stripe_customer_id),
    product_code = excluded.product_code,
    stripe_price_id = coalesce(excluded.stripe_price_id, s.stripe_price_id),
    status = excluded.status,
    current_period_start = coalesce(excluded.current_period_start, s.current_period_start),
    current_period_end = coalesce(excluded.current_period_end, s.current_period_end),
    cancel_at_period_end = excluded.cancel_at_period_end,
    last_event_id = excluded.last_event_id,
    last_event_created = excluded.last_event_created,
    updated_at = now()
  where s.last_event_created < excluded.last_event_created
    or (s.last_event_created = excluded.last_event_created
      and (billing.subscription_status_rank(excluded.status),
        coalesce(excluded.current_period_end, '-infinity'))
        >= (billing.subscription_status_rank(s.status),
          coalesce(s.current_period_end, '-infinity')))
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
'customer.subscription.created / updated / deleted / paused / resumed: records the '
'subscription''s plan, status (collection paused: paused) and period unless a later event was '
'applied (by created, then status rank, then period end: stale), then syncs the account''s plan '
'and status under the account''s lock.';

create function billing.apply_customer_deleted_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_customer_id text := billing.require_stripe_object(p_event, 'customer') ->> 'id';
  v_user_id uuid;
begin
  delete from billing.customers as c
  where c.stripe_customer_id = v_customer_id
  returning c.user_id into v_user_id;
  if v_user_id is null then
    return query select 'ignored'::text,
      format('customer %s is not linked to a user: nothing to unlink', v_customer_id);
    return;
  end if;
  return query select 'applied'::text, format(
    'customer %s deleted in Stripe: unlinked from user %s (a new checkout creates a new customer)',
    v_customer_id, v_user_id);
end;
$$;

comment on function billing.apply_customer_deleted_event(jsonb) is
'customer.deleted: removes the customer''s link to its user (billing.customers), so the service '
'creates a new customer at the next checkout; the tokens and records stay.';

revoke all on function billing.apply_customer_deleted_event(jsonb) from public;

insert into billing.schema_migrations (version, name) values ('20261202200130', 'stripe_subscriptions_v2');
