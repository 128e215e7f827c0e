-- Migration: notifications to the user and the host app: low balance, failed payments,
-- cancellations, disputes, auto top-up results.
--
-- Purpose: a notification is a row the user reads through RLS and receives live on Realtime
-- (billing.notifications is published like the account row), and a delivery in an outbox
-- (billing.notification_deliveries) that the service posts to the host app's HTTPS webhook,
-- signed like Stripe's webhooks, retried with backoff until it is delivered once. Each
-- notification has a dedup key (one per threshold crossing per period, one per Stripe event), so
-- nothing raises it twice. Stripe events raise theirs from a trigger on billing.stripe_events when
-- they are applied: invoice.payment_failed (payment_failed), customer.subscription.deleted
-- (subscription_canceled), charge.dispute.created (dispute_opened).
-- Objects: billing.notifications, billing.notification_deliveries, billing.notify(),
--   billing.tg_stripe_events__notify() and its trigger, public.claim_notification_deliveries(),
--   public.complete_notification_delivery(); billing.notifications in supabase_realtime.
--
-- Delivery is at least once per attempt and exactly once per notification id as the host sees it
-- when it keeps the ids it has processed (the id is in the body and a header): a delivery is
-- marked delivered in the database after the host answered 2xx, and never sent again; a worker
-- that dies between the answer and the mark sends it again after its lease, with the same id.

create table billing.notifications (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references billing.accounts (user_id),
  kind text not null,
  message text not null,
  data jsonb not null default '{}',
  dedup_key text not null,
  created_at timestamptz not null default now(),
  constraint notifications_dedup_key_key unique (dedup_key),
  constraint notifications_kind_known check (
    kind in (
      'low_balance', 'out_of_tokens', 'payment_failed', 'subscription_canceled', 'dispute_opened',
      'auto_top_up_charged', 'auto_top_up_failed'
    )
  ),
  constraint notifications_data_object check (jsonb_typeof(data) = 'object')
);

create index notifications_user_id_created_at_idx on billing.notifications (user_id, created_at desc);

comment on table billing.notifications is
'What token-billing told a user: one row per event worth telling (a threshold crossed in a '
'period, a failed payment, a cancellation, a dispute, an auto top-up result), never two for one '
'dedup_key. The user reads the own rows through RLS and Realtime.';
comment on column billing.notifications.id is 'The notification id; the host webhook dedups on it.';
comment on column billing.notifications.user_id is 'Whom it is for.';
comment on column billing.notifications.kind is
'low_balance, out_of_tokens, payment_failed, subscription_canceled, dispute_opened, '
'auto_top_up_charged, auto_top_up_failed.';
comment on column billing.notifications.message is 'A sentence to show the user.';
comment on column billing.notifications.data is
'Details: threshold percent, available, period_start, Stripe ids, amounts.';
comment on column billing.notifications.dedup_key is
'What makes it unique: threshold:<user>:<period start>:<percent>, stripe:<event id>, '
'auto_top_up:<id>.';
comment on column billing.notifications.created_at is 'When it was raised.';

alter table billing.notifications enable row level security;

create policy notifications_select_own on billing.notifications
for select to authenticated
using (user_id = (select auth.uid()));

revoke all on billing.notifications from public, anon, authenticated, service_role;
grant select on billing.notifications to authenticated, service_role;

do $publication$
begin
  if exists (select 1 from pg_catalog.pg_publication where pubname = 'supabase_realtime')
    and not exists (
      select 1
      from pg_catalog.pg_publication_tables
      where pubname = 'supabase_realtime' and schemaname = 'billing' and tablename = 'notifications'
    ) then
    alter publication supabase_realtime add table billing.notifications;
  end if;
end
$publication$;

create table billing.notification_deliveries (
  notification_id uuid primary key references billing.notifications (id),
  status text not null default 'pending',
  attempts integer not null default 0,
  next_attempt_at timestamptz not null default now(),
  locked_until timestamptz,
  last_error text,
  delivered_at timestamptz,
  constraint notification_deliveries_status_known check (status in ('pending', 'delivered', 'failed')),
  constraint notification_deliveries_attempts_valid check (attempts >= 0),
  constraint notification_deliveries_delivered check ((status = 'delivered') = (delivered_at is not null))
);

create index notification_deliveries_due_idx on billing.notification_deliveries (next_attempt_at)
where status = 'pending';

comment on table billing.notification_deliveries is
'The outbox of the host webhook: one delivery per notification, pending until the host answered '
'2xx (delivered) or the attempts ran out (failed). Claimed with a lease, so one worker sends it '
'at a time.';
comment on column billing.notification_deliveries.notification_id is 'The notification to send.';
comment on column billing.notification_deliveries.status is 'pending, delivered or failed.';
comment on column billing.notification_deliveries.attempts is 'Attempts claimed so far.';
comment on column billing.notification_deliveries.next_attempt_at is
'When it may be tried (again): backoff of 10 s x 2^(attempts - 1), at most an hour.';
comment on column billing.notification_deliveries.locked_until is
'The claiming worker''s lease; another worker may claim it after that.';
comment on column billing.notification_deliveries.last_error is 'Why the last attempt failed.';
comment on column billing.notification_deliveries.delivered_at is 'When the host acknowledged it.';

alter table billing.notification_deliveries enable row level security;
-- No policy: service role only.
revoke all on billing.notification_deliveries from public, anon, authenticated, service_role;
grant select on billing.notification_deliveries to service_role;

create function billing.notify(
  p_user_id uuid,
  p_kind text,
  p_message text,
  p_data jsonb,
  p_dedup_key text
) returns uuid
language plpgsql
set search_path = ''
as $$
declare
  v_id uuid;
begin
  insert into billing.notifications (user_id, kind, message, data, dedup_key)
  values (p_user_id, p_kind, p_message, coalesce(p_data, '{}'), p_dedup_key)
  on conflict (dedup_key) do nothing
  returning id into v_id;
  if v_id is not null then
    insert into billing.notification_deliveries (notification_id) values (v_id);
  end if;
  return v_id;
end;
$$;

comment on function billing.notify(uuid, text, text, jsonb, text) is
'Raises a notification and its webhook delivery, once per dedup key: returns its id, or null '
'when that key was raised before.';

revoke all on function billing.notify(uuid, text, text, jsonb, text) from public;

create function billing.tg_stripe_events__notify() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_object jsonb := new.payload #> '{data,object}';
  v_user_id uuid;
begin
  if new.type = 'invoice.payment_failed' then
    select s.user_id into v_user_id from billing.subscriptions as s
    where s.id = coalesce(billing.stripe_ref(v_object -> 'subscription'),
      v_object #>> '{parent,subscription_details,subscription}');
    if v_user_id is not null then
      perform billing.notify(v_user_id, 'payment_failed', format(
        'Your payment of %s %s failed; update your card to keep your plan.',
        round(coalesce((v_object ->> 'amount_due')::numeric, 0) / 100, 2), upper(v_object ->> 'currency')),
        jsonb_build_object('stripe_invoice', v_object ->> 'id', 'stripe_event_id', new.id,
          'hosted_invoice_url', v_object ->> 'hosted_invoice_url'),
        'stripe:' || new.id);
    end if;
  elsif new.type = 'customer.subscription.deleted' then
    select s.user_id into v_user_id from billing.subscriptions as s where s.id = v_object ->> 'id';
    if v_user_id is not null then
      perform billing.notify(v_user_id, 'subscription_canceled',
        'Your subscription was canceled; you are on the free plan now.',
        jsonb_build_object('stripe_subscription', v_object ->> 'id', 'stripe_event_id', new.id),
        'stripe:' || new.id);
    end if;
  elsif new.type = 'charge.dispute.created' then
    select p.user_id into v_user_id
    from billing.stripe_disputes as d
    inner join billing.stripe_payments as p on p.id = d.payment_id
    where d.id = v_object ->> 'id';
    if v_user_id is not null then
      perform billing.notify(v_user_id, 'dispute_opened',
        'A payment of yours is disputed; its tokens are held until the dispute closes.',
        jsonb_build_object('stripe_dispute', v_object ->> 'id', 'stripe_event_id', new.id),
        'stripe:' || new.id);
    end if;
  end if;
  return null;
end;
$$;

comment on function billing.tg_stripe_events__notify() is
'Raises the user''s notification of an applied Stripe event: invoice.payment_failed, '
'customer.subscription.deleted, charge.dispute.created (once per event id).';

revoke all on function billing.tg_stripe_events__notify() from public;

create trigger tg_stripe_events__notify
after update of status on billing.stripe_events
for each row
when (
  new.status = 'applied' and old.status is distinct from 'applied'
  and new.type in ('invoice.payment_failed', 'customer.subscription.deleted', 'charge.dispute.created')
)
execute function billing.tg_stripe_events__notify();

create function public.claim_notification_deliveries(
  p_limit integer default 10,
  p_lease interval default '1 minute',
  p_as_of timestamptz default now()
)
returns table (
  notification_id uuid,
  user_id uuid,
  kind text,
  message text,
  data jsonb,
  created_at timestamptz,
  attempts integer
)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  if p_limit is null or p_limit < 1 or p_limit > 1000 then
    raise exception using errcode = '22023',
      message = format('p_limit must be from 1 to 1000, got %s', coalesce(p_limit::text, 'null'));
  end if;
  if p_lease is null or p_lease <= interval '0' then
    raise exception using errcode = '22023', message = 'p_lease must be a positive interval';
  end if;
  return query
  with due as (
    select d.notification_id
    from billing.notification_deliveries as d
    where d.status = 'pending' and d.next_attempt_at <= coalesce(p_as_of, now())
      and (d.locked_until is null or d.locked_until <= coalesce(p_as_of, now()))
    order by d.next_attempt_at, d.notification_id
    limit p_limit
    for update skip locked
  ),

  claimed as (
    update billing.notification_deliveries as d
    set attempts = d.attempts + 1, locked_until = coalesce(p_as_of, now()) + p_lease
    from due
    where d.notification_id = due.notification_id
    returning d.notification_id, d.attempts
  )

  select n.id, n.user_id, n.kind, n.message, n.data, n.created_at, c.attempts
  from claimed as c
  inner join billing.notifications as n on n.id = c.notification_id
  order by n.created_at, n.id;
end;
$$;

comment on function public.claim_notification_deliveries(integer, interval, timestamptz) is
'Claims up to p_limit due webhook deliveries for p_lease (skipping those another worker holds) '
'and returns their notifications; the worker posts each and reports it with '
'complete_notification_delivery.';

revoke all on function public.claim_notification_deliveries(integer, interval, timestamptz)
from public, anon, authenticated;
grant execute on function public.claim_notification_deliveries(integer, interval, timestamptz)
to service_role;

create function public.complete_notification_delivery(
  p_notification_id uuid,
  p_delivered boolean,
  p_error text default null,
  p_max_attempts integer default 12
) returns table (status text, next_attempt_at timestamptz)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  if p_delivered is null then
    raise exception using errcode = '22023', message = 'p_delivered must not be null';
  end if;
  return query
  update billing.notification_deliveries as d
  set
    status = case
      when p_delivered then 'delivered'
      when d.attempts >= coalesce(p_max_attempts, 12) then 'failed'
      else 'pending'
    end,
    delivered_at = case when p_delivered then now() end,
    locked_until = null,
    last_error = case when p_delivered then d.last_error else left(p_error, 1000) end,
    -- Backoff: 10 s, 20 s, 40 s, ... at most an hour.
    next_attempt_at = case
      when p_delivered then d.next_attempt_at
      else now() + least(interval '10 seconds' * power(2, greatest(d.attempts - 1, 0)), interval '1 hour')
    end
  where d.notification_id = p_notification_id and d.status = 'pending'
  returning d.status, d.next_attempt_at;
  if not found then
    return query
    select coalesce(d.status, 'unknown'), d.next_attempt_at
    from (select 1) as one
    left join billing.notification_deliveries as d on d.notification_id = p_notification_id;
  end if;
end;
$$;

comment on function public.complete_notification_delivery(uuid, boolean, text, integer) is
'Reports a claimed delivery: delivered (never sent again), or failed with p_error and retried '
'after the backoff until p_max_attempts (then status failed). A delivery already decided answers '
'its status unchanged (unknown for no such notification).';

revoke all on function public.complete_notification_delivery(uuid, boolean, text, integer)
from public, anon, authenticated;
grant execute on function public.complete_notification_delivery(uuid, boolean, text, integer)
to service_role;

insert into billing.schema_migrations (version, name) values ('20261202700200', 'notifications');
