-- Migration: marketplace sales: an agent bought through a Stripe Connect destination charge.
--
-- Purpose: the service sells an agent listing as a Checkout Session whose payment is a
-- destination charge: payment_intent_data.application_fee_amount = the platform's commission,
-- transfer_data.destination = the creator's connected account. quote_listing_sale says what to
-- ask Stripe for; record_marketplace_checkout records the session as Stripe returned it (and the
-- fee and destination sent) before its URL leaves the service. checkout.session.completed (paid)
-- then grants the buyer the agent, once, and marks the sale paid; charge events record its
-- charge and transfer. Refunds and disputes never leave a creator with money the platform paid
-- back: a refund made with reverse_transfer and refund_application_fee (token-billing creators
-- refund) returns the creator's share through Stripe (the refund names its transfer_reversal);
-- a refund without (the Dashboard) and a dispute with funds withdrawn take the creator's share
-- from the creator earnings ledger instead (kinds sale_refund, sale_dispute; debt beyond the
-- balance), given back when the refund fails or the dispute is won. A full refund or a lost
-- dispute revokes the entitlement.
--
-- Rounding, stated once:
--   application_fee_amount = floor(amount x commission_bps / 10000)   (the creator gets the fraction)
--   creator's share of a refund or dispute of r cents = r - floor(application_fee x r / amount)
--     (the fee is returned rounded down, so the platform never returns more than r)
-- Objects: billing.marketplace_sales, billing.marketplace_refunds, billing.marketplace_disputes,
--   public.quote_listing_sale(), public.record_marketplace_checkout(),
--   public.get_marketplace_sale(), billing.marketplace_sale_for_event(),
--   billing.adjust_sale_clawback(), billing.set_sale_entitlement(),
--   billing.apply_marketplace_checkout_event(), billing.apply_marketplace_charge_event(),
--   billing.apply_marketplace_refund_event(), billing.apply_marketplace_dispute_event().
--
-- Lock order: the event row, then the sale row (for update), then creator rows (the earnings
-- ledger); no account is locked (an entitlement is not a balance).

create table billing.marketplace_sales (
  id text primary key,
  product_code text not null references billing.products (code) on update cascade,
  buyer_id uuid not null references billing.accounts (user_id),
  creator_id uuid not null references billing.creators (user_id),
  stripe_account_id text not null,
  amount_cents bigint not null,
  currency text not null,
  commission_bps integer not null,
  application_fee_cents bigint not null,
  livemode boolean not null,
  status text not null default 'open',
  paid_at timestamptz,
  stripe_payment_intent_id text unique,
  stripe_charge_id text unique,
  stripe_transfer_id text,
  refunded_cents bigint not null default 0,
  transfer_reversed_cents bigint not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint marketplace_sales_id_format check (id ~ '^cs_[A-Za-z0-9_]{1,250}$'),
  constraint marketplace_sales_amount_positive check (amount_cents > 0),
  constraint marketplace_sales_currency_format check (currency ~ '^[a-z]{3}$'),
  constraint marketplace_sales_commission_valid check (commission_bps between 0 and 10000),
  -- Integer division of non-negative numbers: floor.
  constraint marketplace_sales_fee_exact check (
    application_fee_cents = amount_cents * commission_bps / 10000
  ),
  constraint marketplace_sales_status_known check (status in ('open', 'paid', 'expired', 'failed')),
  constraint marketplace_sales_refunded_valid check (refunded_cents >= 0 and transfer_reversed_cents >= 0)
);

create index marketplace_sales_buyer_id_idx on billing.marketplace_sales (buyer_id);
create index marketplace_sales_creator_id_idx on billing.marketplace_sales (creator_id);

comment on table billing.marketplace_sales is
'Every agent Checkout Session the service created (a destination charge to the creator), as '
'Stripe returned it, with the fee and destination sent: the platform keeps application_fee_cents '
'= floor(amount_cents x commission_bps / 10000), the creator gets the rest.';
comment on column billing.marketplace_sales.id is 'The Checkout Session, cs_...';
comment on column billing.marketplace_sales.product_code is 'The agent listing sold.';
comment on column billing.marketplace_sales.buyer_id is 'The buyer (metadata.user_id).';
comment on column billing.marketplace_sales.creator_id is 'The creator paid.';
comment on column billing.marketplace_sales.stripe_account_id is 'transfer_data.destination sent.';
comment on column billing.marketplace_sales.amount_cents is 'amount_total, minor units.';
comment on column billing.marketplace_sales.currency is 'ISO currency code, lowercase.';
comment on column billing.marketplace_sales.commission_bps is 'The commission when sold, basis points.';
comment on column billing.marketplace_sales.application_fee_cents is
'payment_intent_data.application_fee_amount sent: floor(amount x commission / 10000).';
comment on column billing.marketplace_sales.livemode is 'Stripe''s livemode of the session.';
comment on column billing.marketplace_sales.status is 'open, paid, expired, failed.';
comment on column billing.marketplace_sales.paid_at is 'Stripe''s time of the paid event.';
comment on column billing.marketplace_sales.stripe_payment_intent_id is 'The payment intent paid.';
comment on column billing.marketplace_sales.stripe_charge_id is 'The charge, from its events.';
comment on column billing.marketplace_sales.stripe_transfer_id is 'The transfer to the creator.';
comment on column billing.marketplace_sales.refunded_cents is 'Refunded now (failed refunds not counted).';
comment on column billing.marketplace_sales.transfer_reversed_cents is
'The transfer''s amount_reversed, from transfer events (refunds made with reverse_transfer).';
comment on column billing.marketplace_sales.created_at is 'When it was recorded.';
comment on column billing.marketplace_sales.updated_at is 'When the row last changed.';

alter table billing.marketplace_sales enable row level security;
-- No policy: service role only.
revoke all on billing.marketplace_sales from public, anon, authenticated, service_role;
grant select on billing.marketplace_sales to service_role;

create table billing.marketplace_refunds (
  id text primary key,
  sale_id text not null references billing.marketplace_sales (id),
  amount_cents bigint not null,
  status text,
  reversed_transfer boolean not null default false,
  clawed_cents bigint not null default 0,
  adjustments integer not null default 0,
  last_event_created timestamptz not null,
  updated_at timestamptz not null default now(),
  constraint marketplace_refunds_id_format check (id ~ '^[a-z]{2,4}_[A-Za-z0-9_]{1,250}$'),
  constraint marketplace_refunds_amounts check (amount_cents >= 0 and clawed_cents >= 0 and adjustments >= 0)
);

create index marketplace_refunds_sale_id_idx on billing.marketplace_refunds (sale_id);

comment on table billing.marketplace_refunds is
'Each refund of a marketplace sale as its latest event said, and what the creator earnings '
'ledger takes for it now (clawed_cents: the creator''s share when the refund did not reverse the '
'transfer and neither failed nor was canceled, else 0).';
comment on column billing.marketplace_refunds.id is 'The refund, re_...';
comment on column billing.marketplace_refunds.sale_id is 'The sale refunded.';
comment on column billing.marketplace_refunds.amount_cents is 'The refund''s amount.';
comment on column billing.marketplace_refunds.status is 'Stripe''s refund status.';
comment on column billing.marketplace_refunds.reversed_transfer is
'The refund names a transfer_reversal: Stripe took the creator''s share back.';
comment on column billing.marketplace_refunds.clawed_cents is 'What the earnings ledger takes for it now.';
comment on column billing.marketplace_refunds.adjustments is 'Entries written for it: the next key suffix.';
comment on column billing.marketplace_refunds.last_event_created is 'Stripe''s created of the event applied.';
comment on column billing.marketplace_refunds.updated_at is 'When the row last changed.';

alter table billing.marketplace_refunds enable row level security;
-- No policy: service role only.
revoke all on billing.marketplace_refunds from public, anon, authenticated, service_role;
grant select on billing.marketplace_refunds to service_role;

create table billing.marketplace_disputes (
  id text primary key,
  sale_id text not null references billing.marketplace_sales (id),
  amount_cents bigint not null,
  status text not null,
  clawed_cents bigint not null default 0,
  adjustments integer not null default 0,
  last_event_created timestamptz not null,
  updated_at timestamptz not null default now(),
  constraint marketplace_disputes_id_format check (id ~ '^(dp|du)_[A-Za-z0-9_]{1,250}$'),
  constraint marketplace_disputes_amounts check (amount_cents >= 0 and clawed_cents >= 0 and adjustments >= 0)
);

create index marketplace_disputes_sale_id_idx on billing.marketplace_disputes (sale_id);

comment on table billing.marketplace_disputes is
'Each dispute of a marketplace sale as its latest event said, and what the creator earnings '
'ledger takes for it now: the creator''s share while funds are withdrawn (needs_response, '
'under_review) or lost, else 0 (inquiries, won).';
comment on column billing.marketplace_disputes.id is 'The dispute, dp_...';
comment on column billing.marketplace_disputes.sale_id is 'The sale disputed.';
comment on column billing.marketplace_disputes.amount_cents is 'The disputed amount.';
comment on column billing.marketplace_disputes.status is 'Stripe''s dispute status.';
comment on column billing.marketplace_disputes.clawed_cents is 'What the earnings ledger takes for it now.';
comment on column billing.marketplace_disputes.adjustments is 'Entries written for it: the next key suffix.';
comment on column billing.marketplace_disputes.last_event_created is 'Stripe''s created of the event applied.';
comment on column billing.marketplace_disputes.updated_at is 'When the row last changed.';

alter table billing.marketplace_disputes enable row level security;
-- No policy: service role only.
revoke all on billing.marketplace_disputes from public, anon, authenticated, service_role;
grant select on billing.marketplace_disputes to service_role;

-- Selling ------------------------------------------------------------------------------------

create function public.quote_listing_sale(p_buyer_id uuid, p_code text)
returns table (
  product_code text,
  name text,
  amount_cents bigint,
  currency text,
  commission_bps integer,
  application_fee_cents bigint,
  stripe_account_id text,
  creator_id uuid
)
language plpgsql stable
security invoker
set search_path = ''
as $$
declare
  v_product billing.products;
  v_creator billing.creators;
  v_bps integer;
begin
  select p.* into v_product from billing.products as p
  where p.code = p_code and p.kind = 'agent' and p.active;
  if not found then
    raise exception using
      errcode = 'TBLST',
      message = format('no active agent listing %s', coalesce(quote_literal(p_code), 'null'));
  end if;
  if v_product.price_cents is null then
    raise exception using
      errcode = 'TBLST',
      message = format('agent %s is sold per run (%s tokens), not for a one-off price', p_code,
        v_product.tokens);
  end if;
  select c.* into v_creator from billing.creators as c where c.user_id = v_product.creator_id;
  if not v_creator.charges_enabled or v_creator.deauthorized_at is not null then
    raise exception using
      errcode = 'TBLST',
      message = format('agent %s cannot be sold now: its creator''s Stripe account does not have '
        'charges_enabled', p_code);
  end if;
  if p_buyer_id = v_product.creator_id then
    raise exception using
      errcode = 'TBLST', message = format('creator %s cannot buy its own agent %s', p_buyer_id, p_code);
  end if;
  if exists (
    select 1 from billing.entitlements as e
    where e.user_id = p_buyer_id and e.product_code = p_code and e.revoked_at is null
  ) then
    raise exception using
      errcode = 'TBENT', message = format('user %s already owns agent %s', p_buyer_id, p_code);
  end if;
  -- The creator's rate, else the platform's (read here: billing functions are not the caller's).
  v_bps := coalesce(v_creator.commission_bps, (select s.marketplace_commission_bps from billing.settings as s));
  return query select
    v_product.code, v_product.name, v_product.price_cents::bigint, v_product.currency, v_bps,
    -- Rounding: the fee is rounded down (integer division), the creator gets the fraction.
    (v_product.price_cents::bigint * v_bps / 10000)::bigint, v_creator.stripe_account_id,
    v_creator.user_id;
end;
$$;

comment on function public.quote_listing_sale(uuid, text) is
'What to ask Stripe for to sell an agent to a buyer: the amount, the application fee '
'(floor(amount x commission_bps / 10000)) and the destination account. TBLST when the listing is '
'not for sale (unknown, per run only, creator without charges_enabled, the buyer is its '
'creator); TBENT when the buyer already owns it. Security invoker.';

revoke all on function public.quote_listing_sale(uuid, text) from public, anon, authenticated;
grant execute on function public.quote_listing_sale(uuid, text) to service_role;

create function public.record_marketplace_checkout(
  p_session jsonb,
  p_application_fee_cents bigint,
  p_destination text
) returns table (status text, detail text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_id text := p_session ->> 'id';
  v_user_text text := p_session #>> '{metadata,user_id}';
  v_code text := p_session #>> '{metadata,product}';
  v_amount bigint;
  v_product billing.products;
  v_creator billing.creators;
  v_bps integer;
  v_sale billing.marketplace_sales;
  v_existing billing.marketplace_sales;
begin
  if p_session is null or jsonb_typeof(p_session) <> 'object'
    or coalesce(p_session ->> 'object', '') <> 'checkout.session'
    or coalesce(v_id, '') !~ '^cs_' or p_session ->> 'mode' is distinct from 'payment' then
    raise exception using
      errcode = '22023',
      message = format('p_session must be a payment-mode Stripe checkout.session with its id, got %s',
        left(coalesce(p_session::text, 'null'), 200));
  end if;
  if v_user_text is null
    or v_user_text !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    raise exception using
      errcode = '22023',
      message = format('p_session.metadata.user_id must be a user id, got %s',
        coalesce(quote_literal(v_user_text), 'null'));
  end if;
  select p.* into v_product from billing.products as p where p.code = v_code and p.kind = 'agent';
  if not found then
    raise exception using
      errcode = '22023',
      message = format('p_session.metadata.product must be an agent listing, got %s',
        coalesce(quote_literal(v_code), 'null'));
  end if;
  v_amount := billing.stripe_bigint(p_session -> 'amount_total', 'p_session.amount_total');
  select c.* into v_creator from billing.creators as c where c.user_id = v_product.creator_id;
  v_bps := billing.creator_commission_bps(v_creator.user_id);
  if v_amount is distinct from v_product.price_cents::bigint
    or lower(p_session ->> 'currency') is distinct from v_product.currency
    or p_application_fee_cents is distinct from v_amount * v_bps / 10000
    or p_destination is distinct from v_creator.stripe_account_id then
    raise exception using
      errcode = 'TBSAL',
      message = format('checkout session %s does not sell agent %s as listed: %s %s, fee %s to '
        'destination %s; the listing says %s %s, fee %s (%s bps) to %s', v_id, v_code,
        coalesce(v_amount::text, 'null'), coalesce(p_session ->> 'currency', 'null'),
        coalesce(p_application_fee_cents::text, 'null'), coalesce(p_destination, 'null'),
        v_product.price_cents, v_product.currency, v_product.price_cents::bigint * v_bps / 10000,
        v_bps, v_creator.stripe_account_id);
  end if;

  perform billing.ensure_account(v_user_text::uuid);
  insert into billing.marketplace_sales (
    id, product_code, buyer_id, creator_id, stripe_account_id, amount_cents, currency,
    commission_bps, application_fee_cents, livemode
  )
  values (
    v_id, v_code, v_user_text::uuid, v_creator.user_id, v_creator.stripe_account_id, v_amount,
    v_product.currency, v_bps, p_application_fee_cents,
    coalesce((p_session ->> 'livemode')::boolean, false)
  )
  on conflict (id) do nothing;
  if found then
    return query select 'applied'::text, format(
      'checkout session %s recorded: agent %s for user %s, %s %s, fee %s, %s to %s', v_id, v_code,
      v_user_text, v_amount, v_product.currency, p_application_fee_cents,
      v_amount - p_application_fee_cents, v_creator.stripe_account_id);
    return;
  end if;
  select s.* into v_existing from billing.marketplace_sales as s where s.id = v_id;
  v_sale := v_existing;
  if (v_existing.product_code, v_existing.buyer_id, v_existing.amount_cents,
      v_existing.application_fee_cents, v_existing.stripe_account_id)
    is distinct from (v_code, v_user_text::uuid, v_amount, p_application_fee_cents, p_destination) then
    raise exception using
      errcode = 'TBSAL',
      message = format('checkout session %s was recorded with other values (%s for user %s, %s, '
        'fee %s)', v_id, v_sale.product_code, v_sale.buyer_id, v_sale.amount_cents,
        v_sale.application_fee_cents);
  end if;
  return query select 'duplicate'::text, format('checkout session %s was already recorded', v_id);
end;
$$;

comment on function public.record_marketplace_checkout(jsonb, bigint, text) is
'Records an agent Checkout Session the service created, as Stripe returned it, with the '
'application fee and destination it sent, before its URL is handed out; they must be the '
'listing''s (amount, currency, floor(amount x commission / 10000), the creator''s account). '
'Statuses: applied, duplicate. 22023 for a session that names no user or agent; TBSAL for other '
'values.';

revoke all on function public.record_marketplace_checkout(jsonb, bigint, text) from public, anon, authenticated;
grant execute on function public.record_marketplace_checkout(jsonb, bigint, text) to service_role;

create function public.get_marketplace_sale(p_sale_id text)
returns table (
  id text,
  product_code text,
  buyer_id uuid,
  creator_id uuid,
  stripe_account_id text,
  amount_cents bigint,
  currency text,
  application_fee_cents bigint,
  status text,
  stripe_payment_intent_id text,
  stripe_charge_id text,
  refunded_cents bigint
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    s.id, s.product_code, s.buyer_id, s.creator_id, s.stripe_account_id, s.amount_cents,
    s.currency, s.application_fee_cents, s.status, s.stripe_payment_intent_id, s.stripe_charge_id,
    s.refunded_cents
  from billing.marketplace_sales as s
  where s.id = p_sale_id
$$;

comment on function public.get_marketplace_sale(text) is
'One marketplace sale (for the refund command). Security invoker: service_role reads it.';

revoke all on function public.get_marketplace_sale(text) from public, anon, authenticated;
grant execute on function public.get_marketplace_sale(text) to service_role;

-- Events of a sale ---------------------------------------------------------------------------

create function billing.marketplace_sale_for_event(p_event jsonb) returns text
language sql stable
set search_path = ''
as $$
  select s.id
  from billing.marketplace_sales as s,
    lateral (select p_event #> '{data,object}' as o) as x
  where s.stripe_payment_intent_id = billing.stripe_ref(x.o -> 'payment_intent')
    or s.stripe_charge_id = case
      when x.o ->> 'object' = 'charge' then x.o ->> 'id' else billing.stripe_ref(x.o -> 'charge')
    end
  limit 1
$$;

comment on function billing.marketplace_sale_for_event(jsonb) is
'The marketplace sale a charge, refund or dispute event is about (by payment intent, else '
'charge), or null.';

revoke all on function billing.marketplace_sale_for_event(jsonb) from public;

create function billing.set_sale_entitlement(
  p_sale billing.marketplace_sales,
  p_revoke boolean,
  p_reason text
) returns text
language plpgsql
set search_path = ''
as $$
begin
  if p_revoke then
    update billing.entitlements as e
    set revoked_at = now(), revoked_reason = p_reason
    where e.sale_id = p_sale.id and e.revoked_at is null;
    return case when found then format('; entitlement revoked (%s)', p_reason) else '' end;
  end if;
  -- A refund that failed or a dispute won gives the agent back, unless bought again since.
  update billing.entitlements as e
  set revoked_at = null, revoked_reason = null
  where e.sale_id = p_sale.id and e.revoked_reason = p_reason
    and not exists (
      select 1 from billing.entitlements as o
      where o.user_id = e.user_id and o.product_code = e.product_code and o.revoked_at is null
    );
  return case when found then '; entitlement restored' else '' end;
end;
$$;

comment on function billing.set_sale_entitlement(billing.marketplace_sales, boolean, text) is
'Revokes the entitlement of a sale for p_reason, or restores one revoked for p_reason when the '
'buyer holds no other; returns a phrase for the event''s detail.';

revoke all on function billing.set_sale_entitlement(billing.marketplace_sales, boolean, text) from public;

create function billing.adjust_sale_clawback(
  p_sale billing.marketplace_sales,
  p_key text,
  p_kind text,
  p_delta_cents bigint,
  p_event_id text
) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_delta_cents > 0 then
    perform billing.take_creator_earnings(
      p_sale.creator_id, p_delta_cents * 1000000, p_kind, p_key, null, null, p_sale.id,
      p_sale.buyer_id, p_sale.product_code, jsonb_build_object('stripe_event_id', p_event_id));
  elsif p_delta_cents < 0 then
    insert into billing.creator_earnings (
      creator_id, kind, amount_microcents, idempotency_key, user_id, product_code, sale_id, metadata
    )
    values (
      p_sale.creator_id, p_kind || '_reversed', -p_delta_cents * 1000000, p_key, p_sale.buyer_id,
      p_sale.product_code, p_sale.id, jsonb_build_object('stripe_event_id', p_event_id)
    )
    on conflict (idempotency_key) do nothing;
  end if;
end;
$$;

comment on function billing.adjust_sale_clawback(billing.marketplace_sales, text, text, bigint, text) is
'Moves what the creator earnings ledger takes for a refund or dispute of a sale by p_delta_cents: '
'a debit of p_kind (sale_refund, sale_dispute; debt beyond the balance) or a credit of '
'<p_kind>_reversed.';

revoke all on function billing.adjust_sale_clawback(billing.marketplace_sales, text, text, bigint, text)
from public;

create function billing.apply_marketplace_checkout_event(p_event jsonb, p_sale_id text)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_type text := p_event ->> 'type';
  v_session jsonb := billing.require_stripe_object(p_event, 'checkout.session');
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_amount bigint := billing.stripe_bigint(v_session -> 'amount_total', 'amount_total');
  v_intent text := billing.stripe_ref(v_session -> 'payment_intent');
  v_sale billing.marketplace_sales;
begin
  select s.* into v_sale from billing.marketplace_sales as s where s.id = p_sale_id for update;
  if v_type in ('checkout.session.expired', 'checkout.session.async_payment_failed') then
    update billing.marketplace_sales as s
    set
      status = case when v_type = 'checkout.session.expired' then 'expired' else 'failed' end,
      updated_at = now()
    where s.id = p_sale_id and s.status = 'open';
    return query select 'ignored'::text, format('agent checkout session %s %s: nothing sold',
      p_sale_id, case when v_type = 'checkout.session.expired' then 'expired' else 'failed' end);
    return;
  end if;
  if v_type = 'checkout.session.completed'
    and coalesce(v_session ->> 'payment_status', '') not in ('paid', 'no_payment_required') then
    return query select 'ignored'::text, format(
      'agent checkout session %s completed with payment_status %s: granted on '
      'checkout.session.async_payment_succeeded', p_sale_id,
      coalesce(v_session ->> 'payment_status', 'null'));
    return;
  end if;
  if (v_amount, lower(v_session ->> 'currency')) is distinct from (v_sale.amount_cents, v_sale.currency) then
    return query select 'parked'::text, format(
      'agent checkout session %s paid %s %s, but it was sold for %s %s: not granted', p_sale_id,
      coalesce(v_amount::text, 'null'), coalesce(v_session ->> 'currency', 'null'),
      v_sale.amount_cents, v_sale.currency);
    return;
  end if;
  if v_sale.status = 'paid' then
    return query select 'duplicate'::text, format('agent checkout session %s was already granted',
      p_sale_id);
    return;
  end if;

  -- Refunds or disputes of this payment that are parking wait for this (lock_stripe_refs).
  perform billing.lock_stripe_refs(array[v_intent]);
  update billing.marketplace_sales as s
  set
    status = 'paid', paid_at = v_created,
    stripe_payment_intent_id = coalesce(s.stripe_payment_intent_id, v_intent), updated_at = now()
  where s.id = p_sale_id;
  insert into billing.entitlements (user_id, product_code, sale_id, granted_at)
  values (v_sale.buyer_id, v_sale.product_code, p_sale_id, v_created)
  on conflict do nothing;
  return query select 'applied'::text, format(
    'agent %s sold to user %s by checkout session %s: %s %s, platform fee %s, %s to creator %s (%s)%s',
    v_sale.product_code, v_sale.buyer_id, p_sale_id, v_sale.amount_cents, v_sale.currency,
    v_sale.application_fee_cents, v_sale.amount_cents - v_sale.application_fee_cents,
    v_sale.creator_id, v_sale.stripe_account_id,
    case when found then '' else '; the user already owned it (no second entitlement)' end);
end;
$$;

comment on function billing.apply_marketplace_checkout_event(jsonb, text) is
'checkout.session.* of a recorded agent sale: a paid one marks the sale paid and grants the buyer '
'the agent once (duplicate after); the amount and currency paid are checked (parked otherwise); '
'expired and failed sessions are marked and ignored.';

revoke all on function billing.apply_marketplace_checkout_event(jsonb, text) from public;

create function billing.apply_marketplace_charge_event(p_event jsonb, p_sale_id text)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_charge jsonb := billing.require_stripe_object(p_event, 'charge');
  v_transfer text := billing.stripe_ref(v_charge -> 'transfer');
begin
  update billing.marketplace_sales as s
  set
    stripe_charge_id = v_charge ->> 'id',
    stripe_transfer_id = coalesce(v_transfer, s.stripe_transfer_id),
    updated_at = now()
  where s.id = p_sale_id
    and (s.stripe_charge_id, s.stripe_transfer_id) is distinct from
      (v_charge ->> 'id', coalesce(v_transfer, s.stripe_transfer_id));
  if not found then
    return query select 'duplicate'::text, format('sale %s already names charge %s', p_sale_id,
      v_charge ->> 'id');
    return;
  end if;
  return query select 'applied'::text, format('sale %s: charge %s, transfer %s', p_sale_id,
    v_charge ->> 'id', coalesce(v_transfer, 'not yet'));
end;
$$;

comment on function billing.apply_marketplace_charge_event(jsonb, text) is
'charge.succeeded / charge.updated of a marketplace sale: records its charge and transfer ids.';

revoke all on function billing.apply_marketplace_charge_event(jsonb, text) from public;

create function billing.apply_marketplace_refund_event(p_event jsonb, p_sale_id text)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_object jsonb := p_event #> '{data,object}';
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_sale billing.marketplace_sales;
  v_refund jsonb;
  v_existing billing.marketplace_refunds;
  v_amount bigint;
  v_status text;
  v_reversed boolean;
  v_target bigint;
  v_refunded bigint;
  v_changed integer := 0;
  v_note text;
begin
  select s.* into v_sale from billing.marketplace_sales as s where s.id = p_sale_id for update;
  update billing.marketplace_sales as s
  set
    stripe_charge_id = coalesce(s.stripe_charge_id, case
      when v_object ->> 'object' = 'charge' then v_object ->> 'id'
      else billing.stripe_ref(v_object -> 'charge') end),
    stripe_transfer_id = coalesce(s.stripe_transfer_id, billing.stripe_ref(v_object -> 'transfer'))
  where s.id = p_sale_id;

  for v_refund in
    select r.value
    from jsonb_array_elements(case
      when v_object ->> 'object' = 'refund' then jsonb_build_array(v_object)
      when jsonb_typeof(v_object #> '{refunds,data}') = 'array' then v_object #> '{refunds,data}'
      else '[]'
    end) as r (value)
    where r.value ->> 'id' is not null
  loop
    v_amount := greatest(coalesce(billing.stripe_bigint(v_refund -> 'amount', 'refund amount'), 0), 0);
    v_status := v_refund ->> 'status';
    v_reversed := billing.stripe_ref(v_refund -> 'transfer_reversal') is not null;
    select r.* into v_existing from billing.marketplace_refunds as r where r.id = v_refund ->> 'id';
    if v_existing.id is not null and (
      v_existing.last_event_created > v_created
      or (v_existing.last_event_created = v_created
        and billing.refund_status_rank(v_existing.status) > billing.refund_status_rank(v_status))
    ) then
      continue;
    end if;
    -- The creator's share of a refund Stripe did not take back: r - floor(fee x r / amount).
    v_target := case
      when coalesce(v_status, '') in ('failed', 'canceled') or v_reversed then 0
      else v_amount - v_sale.application_fee_cents * v_amount / v_sale.amount_cents
    end;
    insert into billing.marketplace_refunds as r (
      id, sale_id, amount_cents, status, reversed_transfer, last_event_created
    )
    values (v_refund ->> 'id', p_sale_id, v_amount, v_status, v_reversed, v_created)
    on conflict (id) do update
    set
      amount_cents = excluded.amount_cents, status = excluded.status,
      reversed_transfer = r.reversed_transfer or excluded.reversed_transfer,
      last_event_created = excluded.last_event_created, updated_at = now()
    returning r.* into v_existing;
    if v_existing.reversed_transfer then
      v_target := 0;
    end if;
    if v_target <> v_existing.clawed_cents then
      perform billing.adjust_sale_clawback(
        v_sale, format('sale-refund:%s:n%s', v_existing.id, v_existing.adjustments + 1),
        'sale_refund', v_target - v_existing.clawed_cents, p_event ->> 'id');
      update billing.marketplace_refunds as r
      set clawed_cents = v_target, adjustments = r.adjustments + 1
      where r.id = v_existing.id;
      v_changed := v_changed + 1;
    end if;
  end loop;

  v_refunded := least(v_sale.amount_cents, greatest(
    coalesce((
      select sum(r.amount_cents) from billing.marketplace_refunds as r
      where r.sale_id = p_sale_id and coalesce(r.status, '') not in ('failed', 'canceled')
    ), 0),
    case when v_object ->> 'object' = 'charge'
      then coalesce(billing.stripe_bigint(v_object -> 'amount_refunded', 'amount_refunded'), 0)
      else 0 end
  ))::bigint;
  update billing.marketplace_sales as s
  set refunded_cents = v_refunded, updated_at = now()
  where s.id = p_sale_id;
  v_note := billing.set_sale_entitlement(v_sale, v_refunded >= v_sale.amount_cents, 'refunded');

  return query select 'applied'::text, format(
    'agent sale %s: %s of %s cents refunded; creator %s returns %s cents through the earnings '
    'ledger for refunds that did not reverse the transfer%s', p_sale_id, v_refunded,
    v_sale.amount_cents, v_sale.creator_id,
    coalesce((select sum(r.clawed_cents) from billing.marketplace_refunds as r where r.sale_id = p_sale_id), 0),
    v_note);
end;
$$;

comment on function billing.apply_marketplace_refund_event(jsonb, text) is
'charge.refunded, refund.* and charge.refund.updated of a marketplace sale: records each refund''s '
'latest status; a refund that neither reversed the transfer nor failed takes the creator''s share '
'(r - floor(fee x r / amount)) from the earnings ledger, given back if it fails; a full refund '
'revokes the entitlement.';

revoke all on function billing.apply_marketplace_refund_event(jsonb, text) from public;

create function billing.apply_marketplace_dispute_event(p_event jsonb, p_sale_id text)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_dispute jsonb := billing.require_stripe_object(p_event, 'dispute');
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_status text := coalesce(v_dispute ->> 'status', 'unknown');
  v_amount bigint := greatest(coalesce(billing.stripe_bigint(v_dispute -> 'amount', 'amount'), 0), 0);
  v_sale billing.marketplace_sales;
  v_existing billing.marketplace_disputes;
  v_target bigint;
  v_note text;
begin
  select s.* into v_sale from billing.marketplace_sales as s where s.id = p_sale_id for update;
  select d.* into v_existing from billing.marketplace_disputes as d
  where d.id = v_dispute ->> 'id' for update;
  if v_existing.id is not null and (
    v_existing.last_event_created > v_created
    or (v_existing.last_event_created = v_created
      and billing.dispute_status_rank(v_existing.status) > billing.dispute_status_rank(v_status))
  ) then
    return query select 'stale'::text, format('dispute %s: a later event was already applied',
      v_existing.id);
    return;
  end if;
  v_amount := least(v_amount, v_sale.amount_cents);
  -- Funds withdrawn or lost: the creator's share, r - floor(fee x r / amount), comes back.
  v_target := case
    when v_status in ('needs_response', 'under_review', 'lost')
      then v_amount - v_sale.application_fee_cents * v_amount / v_sale.amount_cents
    else 0
  end;
  insert into billing.marketplace_disputes as d (id, sale_id, amount_cents, status, last_event_created)
  values (v_dispute ->> 'id', p_sale_id, v_amount, v_status, v_created)
  on conflict (id) do update
  set
    amount_cents = excluded.amount_cents, status = excluded.status,
    last_event_created = excluded.last_event_created, updated_at = now()
  returning d.* into v_existing;
  if v_target <> v_existing.clawed_cents then
    perform billing.adjust_sale_clawback(
      v_sale, format('sale-dispute:%s:n%s', v_existing.id, v_existing.adjustments + 1),
      'sale_dispute', v_target - v_existing.clawed_cents, p_event ->> 'id');
    update billing.marketplace_disputes as d
    set clawed_cents = v_target, adjustments = d.adjustments + 1
    where d.id = v_existing.id;
  end if;
  v_note := billing.set_sale_entitlement(v_sale, v_status = 'lost', 'dispute lost');
  return query select 'applied'::text, format(
    'agent sale %s: dispute %s %s (%s cents); the creator''s earnings give back %s cents%s',
    p_sale_id, v_existing.id, v_status, v_amount, v_target, v_note);
end;
$$;

comment on function billing.apply_marketplace_dispute_event(jsonb, text) is
'charge.dispute.* of a marketplace sale: while funds are withdrawn or after a loss the creator''s '
'share of the disputed amount is taken from the earnings ledger (kind sale_dispute, debt beyond '
'the balance), given back when it is won; a lost dispute revokes the entitlement; stale for an '
'older event.';

revoke all on function billing.apply_marketplace_dispute_event(jsonb, text) from public;

insert into billing.schema_migrations (version, name) values ('20261202800300', 'marketplace_sales');
