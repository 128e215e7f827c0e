-- Migration: what token-billing remembers about Stripe.
--
-- Purpose: the records the Stripe event handler (20261121001000_stripe_common.sql onward) reads and
-- writes besides the ledger: which user a Stripe customer belongs to, the state of each
-- subscription, every event received with its outcome, and every payment that credited tokens,
-- with its refunds and disputes, so that a refund or a dispute takes back exactly the tokens
-- that payment gave.
-- Objects: billing.customers, billing.subscriptions, billing.stripe_events,
--   billing.stripe_payments, billing.stripe_refunds, billing.stripe_disputes,
--   billing.link_customer(), public.link_stripe_customer().
--
-- All six tables are written only by the token-billing functions (security definer, owned by
-- the migration role). RLS is enabled on each with no policy: service role only. service_role
-- may read them (the service looks up a user's Stripe customer before a checkout; operators read
-- parked events); no API role may write them.

-- Customers -------------------------------------------------------------------------------------

create table billing.customers (
  stripe_customer_id text primary key,
  user_id uuid not null references billing.accounts (user_id),
  created_at timestamptz not null default now(),
  constraint customers_stripe_customer_id_format check (
    stripe_customer_id ~ '^cus_[A-Za-z0-9]{1,250}$'
  )
);

create index customers_user_id_idx on billing.customers (user_id);

comment on table billing.customers is
'Which user each Stripe customer belongs to. A customer belongs to exactly one user, for good '
'(never relinked); a user may have several customers. Written by link_stripe_customer (the '
'service, before a checkout) and by the event handler from checkout or subscription metadata.';
comment on column billing.customers.stripe_customer_id is 'The Stripe customer id (cus_...); unique.';
comment on column billing.customers.user_id is 'The user (auth.users.id) the customer belongs to.';
comment on column billing.customers.created_at is 'When the link was made.';

alter table billing.customers enable row level security;
-- No policy: service role only.

revoke all on billing.customers from public, anon, authenticated, service_role;
grant select on billing.customers to service_role;

-- Subscriptions ---------------------------------------------------------------------------------

create table billing.subscriptions (
  id text primary key,
  user_id uuid not null references billing.accounts (user_id),
  stripe_customer_id text,
  product_code text not null references billing.products (code) on update cascade,
  stripe_price_id text,
  status text not null,
  current_period_start timestamptz,
  current_period_end timestamptz,
  cancel_at_period_end boolean not null default false,
  last_event_id text not null,
  last_event_created timestamptz not null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint subscriptions_id_format check (id ~ '^sub_[A-Za-z0-9]{1,250}$'),
  constraint subscriptions_status_known check (
    status in (
      'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled', 'unpaid',
      'paused'
    )
  ),
  constraint subscriptions_period_ordered check (current_period_end >= current_period_start)
);

create index subscriptions_user_id_idx on billing.subscriptions (user_id);

comment on table billing.subscriptions is
'The last applied state of each Stripe subscription. Changed only by an event at least as '
'recent (by Stripe''s created) as last_event_created: an older one is stale and changes nothing.';
comment on column billing.subscriptions.id is 'The Stripe subscription id (sub_...).';
comment on column billing.subscriptions.user_id is 'The subscriber; never changes once recorded.';
comment on column billing.subscriptions.stripe_customer_id is 'The Stripe customer paying for it.';
comment on column billing.subscriptions.product_code is
'The plan (billing.products of kind plan) its item''s price maps to.';
comment on column billing.subscriptions.stripe_price_id is 'The Stripe price of that item.';
comment on column billing.subscriptions.status is
'Stripe''s subscription status as of last_event_created (canceled once deleted).';
comment on column billing.subscriptions.current_period_start is
'Start of the current billing period (on the subscription before API 2025-03-31, on its item after).';
comment on column billing.subscriptions.current_period_end is 'End of the current billing period.';
comment on column billing.subscriptions.cancel_at_period_end is
'True when the subscription ends at current_period_end instead of renewing.';
comment on column billing.subscriptions.last_event_id is 'The event that last changed this row.';
comment on column billing.subscriptions.last_event_created is
'Stripe''s created time of that event: the watermark below which events are stale.';
comment on column billing.subscriptions.created_at is 'When the subscription was first recorded.';
comment on column billing.subscriptions.updated_at is 'When the row last changed.';

alter table billing.subscriptions enable row level security;
-- No policy: service role only.

revoke all on billing.subscriptions from public, anon, authenticated, service_role;
grant select on billing.subscriptions to service_role;

-- Events ----------------------------------------------------------------------------------------

create table billing.stripe_events (
  id text primary key,
  type text not null,
  api_version text,
  created timestamptz not null,
  livemode boolean not null default false,
  payload jsonb not null,
  received_at timestamptz not null default now(),
  status text not null default 'received',
  detail text,
  attempts integer not null default 1,
  processed_at timestamptz,
  constraint stripe_events_id_length check (length(id) between 1 and 255),
  constraint stripe_events_type_length check (length(type) between 1 and 255),
  constraint stripe_events_status_known check (
    status in ('received', 'applied', 'duplicate', 'ignored', 'stale', 'parked')
  ),
  constraint stripe_events_attempts_positive check (attempts >= 1),
  constraint stripe_events_processed check ((status = 'received') = (processed_at is null)),
  constraint stripe_events_payload_object check (jsonb_typeof(payload) = 'object')
);

-- replay_parked_stripe_events() walks the parked events oldest first.
create index stripe_events_parked_idx on billing.stripe_events (created, received_at, id)
where status = 'parked';

comment on table billing.stripe_events is
'Every Stripe event received, once per event id, stored in the same transaction as its effects '
'with its outcome. Parked events are replayable; no other status is ever re-run.';
comment on column billing.stripe_events.id is 'The Stripe event id (evt_...); unique.';
comment on column billing.stripe_events.type is 'The event type, e.g. checkout.session.completed.';
comment on column billing.stripe_events.api_version is 'The API version the payload is shaped by.';
comment on column billing.stripe_events.created is 'Stripe''s created time of the event.';
comment on column billing.stripe_events.livemode is 'True for live-mode events.';
comment on column billing.stripe_events.payload is 'The whole event as received; replays read it.';
comment on column billing.stripe_events.received_at is 'When the event was first received.';
comment on column billing.stripe_events.status is
'Outcome: applied, duplicate (its effect already existed), ignored, stale, parked (no user or '
'product yet; replayable). received exists only inside the handling transaction, never committed.';
comment on column billing.stripe_events.detail is 'Why: what was credited or debited, or the reason.';
comment on column billing.stripe_events.attempts is
'How many times the event was handled: 1, plus one per redelivery or replay while parked.';
comment on column billing.stripe_events.processed_at is 'When the current status was decided.';

alter table billing.stripe_events enable row level security;
-- No policy: service role only.

revoke all on billing.stripe_events from public, anon, authenticated, service_role;
grant select on billing.stripe_events to service_role;

-- Payments, refunds, disputes -------------------------------------------------------------------

create table billing.stripe_payments (
  id text primary key,
  source text not null,
  user_id uuid not null references billing.accounts (user_id),
  product_code text not null references billing.products (code) on update cascade,
  quantity integer not null,
  tokens bigint not null,
  amount_paid_cents bigint not null,
  currency text,
  stripe_payment_intent_id text unique,
  stripe_charge_id text unique,
  refunded_cents bigint not null default 0,
  tokens_clawed_back bigint not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint stripe_payments_source_known check (
    (source = 'checkout_session' and id ~ '^cs_[A-Za-z0-9_]{1,250}$')
    or (source = 'invoice' and id ~ '^in_[A-Za-z0-9_]{1,250}$')
  ),
  constraint stripe_payments_quantity_positive check (quantity > 0),
  constraint stripe_payments_tokens_positive check (tokens > 0),
  constraint stripe_payments_amount_not_negative check (amount_paid_cents >= 0),
  constraint stripe_payments_refunded_not_negative check (refunded_cents >= 0),
  constraint stripe_payments_clawed_back_within_tokens check (
    tokens_clawed_back between 0 and tokens
  )
);

create index stripe_payments_user_id_idx on billing.stripe_payments (user_id);

comment on table billing.stripe_payments is
'Every Stripe payment that credited tokens: a token-pack checkout session or a paid subscription '
'invoice. Refunds and disputes find their payment here (by payment intent or charge) and take '
'back at most its tokens: tokens_clawed_back plus tokens held or kept by disputes <= tokens.';
comment on column billing.stripe_payments.id is
'The Stripe object the credit is keyed on: checkout session (cs_...) or invoice (in_...).';
comment on column billing.stripe_payments.source is 'checkout_session or invoice.';
comment on column billing.stripe_payments.user_id is 'The user credited.';
comment on column billing.stripe_payments.product_code is 'The pack or plan paid for.';
comment on column billing.stripe_payments.quantity is 'Packs bought (or plan quantity).';
comment on column billing.stripe_payments.tokens is 'Tokens credited: product tokens x quantity.';
comment on column billing.stripe_payments.amount_paid_cents is
'What the customer paid, in the currency''s minor unit; refunds are proportions of it.';
comment on column billing.stripe_payments.currency is 'ISO currency code of the amounts.';
comment on column billing.stripe_payments.stripe_payment_intent_id is
'The payment intent (pi_...) refunds and disputes name; unique.';
comment on column billing.stripe_payments.stripe_charge_id is
'The charge (ch_...), once an event revealed it; unique.';
comment on column billing.stripe_payments.refunded_cents is
'The highest cumulative amount_refunded a charge.refunded event reported (never decreases).';
comment on column billing.stripe_payments.tokens_clawed_back is
'Tokens already debited for refunds (kind clawback); only grows, up to tokens.';
comment on column billing.stripe_payments.created_at is 'When the payment was recorded.';
comment on column billing.stripe_payments.updated_at is 'When the row last changed.';

alter table billing.stripe_payments enable row level security;
-- No policy: service role only.

revoke all on billing.stripe_payments from public, anon, authenticated, service_role;
grant select on billing.stripe_payments to service_role;

create table billing.stripe_refunds (
  id text primary key,
  payment_id text not null references billing.stripe_payments (id),
  amount_cents bigint not null,
  status text,
  created_at timestamptz not null default now(),
  constraint stripe_refunds_id_format check (id ~ '^(re|pyr)_[A-Za-z0-9_]{1,250}$'),
  constraint stripe_refunds_amount_positive check (amount_cents > 0)
);

create index stripe_refunds_payment_id_idx on billing.stripe_refunds (payment_id);

comment on table billing.stripe_refunds is
'Every individual refund seen (from refund.created or listed in charge.refunded), once per id. '
'The refunded amount of a payment is the greater of its reported cumulative refunded_cents and '
'the sum of its counted refunds here, so two events describing one refund count it once.';
comment on column billing.stripe_refunds.id is 'The Stripe refund id (re_... or pyr_...).';
comment on column billing.stripe_refunds.payment_id is 'The payment refunded.';
comment on column billing.stripe_refunds.amount_cents is 'Amount refunded, in the minor unit.';
comment on column billing.stripe_refunds.status is
'Stripe''s refund status when first seen; failed and canceled refunds are not counted.';
comment on column billing.stripe_refunds.created_at is 'When the refund was recorded.';

alter table billing.stripe_refunds enable row level security;
-- No policy: service role only.

revoke all on billing.stripe_refunds from public, anon, authenticated, service_role;
grant select on billing.stripe_refunds to service_role;

create table billing.stripe_disputes (
  id text primary key,
  payment_id text not null references billing.stripe_payments (id),
  amount_cents bigint not null,
  tokens_held bigint not null default 0,
  status text not null,
  resolution text not null default 'held',
  last_event_created timestamptz not null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint stripe_disputes_id_format check (id ~ '^(dp|du)_[A-Za-z0-9_]{1,250}$'),
  constraint stripe_disputes_amount_not_negative check (amount_cents >= 0),
  constraint stripe_disputes_tokens_not_negative check (tokens_held >= 0),
  constraint stripe_disputes_resolution_known check (resolution in ('held', 'returned', 'kept'))
);

create index stripe_disputes_payment_id_idx on billing.stripe_disputes (payment_id);

comment on table billing.stripe_disputes is
'Every dispute of a recorded payment. Its tokens leave the balance when it opens (a debit, kind '
'dispute, so they cannot be spent while disputed); resolution moves once from held to returned '
'(won or closed without a loss: credited back, kind dispute_won) or kept (lost: final).';
comment on column billing.stripe_disputes.id is 'The Stripe dispute id (dp_... or du_...).';
comment on column billing.stripe_disputes.payment_id is 'The disputed payment.';
comment on column billing.stripe_disputes.amount_cents is 'Disputed amount, in the minor unit.';
comment on column billing.stripe_disputes.tokens_held is
'Tokens debited for the dispute: the disputed share of the payment''s tokens, at most what '
'refunds and other disputes left.';
comment on column billing.stripe_disputes.status is 'Stripe''s dispute status as last applied.';
comment on column billing.stripe_disputes.resolution is
'held (open), returned (tokens credited back) or kept (lost); leaves held at most once.';
comment on column billing.stripe_disputes.last_event_created is
'Stripe''s created time of the last event applied; older events are stale.';
comment on column billing.stripe_disputes.created_at is 'When the dispute was recorded.';
comment on column billing.stripe_disputes.updated_at is 'When the row last changed.';

alter table billing.stripe_disputes enable row level security;
-- No policy: service role only.

revoke all on billing.stripe_disputes from public, anon, authenticated, service_role;
grant select on billing.stripe_disputes to service_role;

-- Linking a customer to a user ------------------------------------------------------------------

create function billing.link_customer(
  p_stripe_customer_id text,
  p_user_id uuid
) returns uuid
language plpgsql
set search_path = ''
as $$
declare
  v_owner uuid;
begin
  insert into billing.customers (stripe_customer_id, user_id)
  values (p_stripe_customer_id, p_user_id)
  on conflict (stripe_customer_id) do nothing
  returning user_id into v_owner;

  if v_owner is null then
    select c.user_id into v_owner
    from billing.customers as c
    where c.stripe_customer_id = p_stripe_customer_id;
  end if;
  return v_owner;
end;
$$;

comment on function billing.link_customer(text, uuid) is
'Links the customer to the user unless it is already linked; returns the user it belongs to '
'afterwards (another user when it was linked before: customers are never relinked). The account '
'must exist.';

revoke all on function billing.link_customer(text, uuid) from public;

create function public.link_stripe_customer(
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
'any checkout), opening the user''s account if missing. Statuses: applied, duplicate. 22023 on '
'invalid arguments; TBCUS if the customer belongs to another user.';

revoke all on function public.link_stripe_customer(uuid, text) from public, anon, authenticated;
grant execute on function public.link_stripe_customer(uuid, text) to service_role;

insert into billing.schema_migrations (version, name) values ('20261121000900', 'stripe_records');
