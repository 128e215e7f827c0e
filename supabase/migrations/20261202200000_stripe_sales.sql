-- Migration: what was sold, and what Stripe events wait for.
--
-- Purpose: credits come from what the service sold, never from metadata alone. The service
-- records each Checkout Session and PaymentIntent it creates (record_checkout_session,
-- record_payment_intent) before it hands the URL or client secret out; the event handler credits
-- from that record and cross-checks the amount and currency paid. Besides: the deployment's
-- Stripe mode (billing.settings.stripe_livemode), what a trial grants (products.trial_tokens),
-- the link of invoices to their payments (API 2025-03-31 invoices name no payment intent), the
-- refund lifecycle (a refund's latest status), and the objects a parked event waits for, so it
-- is applied in the same transaction as the event that makes its object appear.
-- Objects: billing.settings.stripe_livemode, billing.products.trial_tokens, billing.stripe_sales,
--   billing.stripe_invoice_payments, columns of billing.stripe_payments, billing.stripe_refunds,
--   billing.stripe_disputes and billing.stripe_events, ledger kind clawback_reversed,
--   public.record_checkout_session(), public.record_payment_intent().

-- Settings and catalog --------------------------------------------------------------------------

alter table billing.settings
add column stripe_livemode boolean not null default false;

update billing.settings set stripe_livemode = billing.setting_boolean('stripe_livemode', false);

comment on column billing.settings.stripe_livemode is
'The Stripe mode of this deployment: true for live keys. Events whose livemode differs are stored '
'ignored (a signed test-mode event never credits a live deployment). Set at install from '
'token_billing.stripe_livemode (default off); change with an update as the owner.';

alter table billing.products
add column trial_tokens bigint,
add constraint products_trial_tokens_valid check (
  trial_tokens is null or (kind = 'plan' and trial_tokens >= 0)
);

comment on column billing.products.trial_tokens is
'What a plan''s trial grants for the trial period (the $0 subscription_create invoice): null '
'means the plan''s tokens, 0 nothing. Packs have none.';

-- Ledger: a failed or canceled refund gives back what it clawed ---------------------------------

create or replace function billing.ledger_entry_is_valid(
  p_kind text,
  p_amount bigint,
  p_idempotency_key text,
  p_reservation_id uuid,
  p_metadata jsonb
) returns boolean
language plpgsql immutable
set search_path = ''
as $$
begin
  return coalesce(
    -- Credits are positive, debits negative.
    (
      (
        p_kind in (
          'purchase', 'subscription', 'promotion', 'adjustment', 'refund', 'signup', 'dispute_won',
          'clawback_reversed'
        ) and p_amount > 0
      )
      or (p_kind in ('usage', 'expiry', 'clawback', 'dispute') and p_amount < 0)
    )
    and length(p_idempotency_key) between 1 and 255
    and jsonb_typeof(p_metadata) = 'object'
    -- Keys shaped like the ones token-billing makes for itself are accepted only on the entry
    -- they describe (see 20261121000400_ledger.sql).
    and (p_idempotency_key not like 'signup:%' or p_kind = 'signup')
    and (p_idempotency_key not like 'expiry:%' or p_kind = 'expiry')
    and (
      p_idempotency_key not like 'reservation:%'
      or p_idempotency_key = 'reservation:' || p_reservation_id::text
    )
    and (
      p_idempotency_key not like 'stripe:%'
      or (
        p_kind in (
          'purchase', 'subscription', 'clawback', 'dispute', 'dispute_won', 'clawback_reversed'
        )
        and p_metadata ? 'stripe_event_id'
      )
    ),
    -- A rule that evaluates to null (a null reservation_id above) is a violation, not a pass.
    false
  );
end;
$$;

comment on function billing.ledger_entry_is_valid(text, bigint, text, uuid, jsonb) is
'CHECK of billing.ledger_entries: credits (purchase, subscription, promotion, adjustment, refund, '
'signup, dispute_won, clawback_reversed) positive, debits (usage, expiry, clawback, dispute) '
'negative; a key of 1..255 characters; metadata an object; keys in token-billing''s own '
'namespaces (signup:, expiry:, reservation:, stripe:) only on the entries they describe.';

-- Sales -----------------------------------------------------------------------------------------

create table billing.stripe_sales (
  id text primary key,
  kind text not null,
  user_id uuid not null references billing.accounts (user_id),
  product_code text not null references billing.products (code) on update cascade,
  quantity integer not null,
  amount_cents bigint not null,
  currency text not null,
  livemode boolean not null,
  created_at timestamptz not null default now(),
  constraint stripe_sales_kind_known check (
    (kind = 'checkout_session' and id ~ '^cs_[A-Za-z0-9_]{1,250}$')
    or (kind = 'payment_intent' and id ~ '^pi_[A-Za-z0-9_]{1,250}$')
  ),
  constraint stripe_sales_quantity_positive check (quantity between 1 and 999999),
  constraint stripe_sales_amount_not_negative check (amount_cents >= 0),
  constraint stripe_sales_currency_format check (currency ~ '^[a-z]{3}$')
);

create index stripe_sales_user_id_idx on billing.stripe_sales (user_id);

comment on table billing.stripe_sales is
'Every Checkout Session and PaymentIntent the service created, as Stripe returned it, recorded '
'before its URL or client secret left the service. A paid one credits from this record; the '
'amount and currency paid must match it. Never changed once written.';
comment on column billing.stripe_sales.id is 'The session (cs_...) or payment intent (pi_...).';
comment on column billing.stripe_sales.kind is 'checkout_session or payment_intent.';
comment on column billing.stripe_sales.user_id is 'The buyer (metadata.user_id).';
comment on column billing.stripe_sales.product_code is 'The product sold (metadata.product).';
comment on column billing.stripe_sales.quantity is 'How many (metadata.quantity, default 1).';
comment on column billing.stripe_sales.amount_cents is
'amount_total (session) or amount (payment intent), in the currency''s minor unit.';
comment on column billing.stripe_sales.currency is 'ISO currency code, lowercase.';
comment on column billing.stripe_sales.livemode is 'Stripe''s livemode of the object.';
comment on column billing.stripe_sales.created_at is 'When it was recorded.';

alter table billing.stripe_sales enable row level security;
-- No policy: service role only.

revoke all on billing.stripe_sales from public, anon, authenticated, service_role;
grant select on billing.stripe_sales to service_role;

-- Invoice payments (API 2025-03-31: invoices name no payment intent or charge) -------------------

create table billing.stripe_invoice_payments (
  id text primary key,
  invoice_id text not null,
  stripe_payment_intent_id text,
  stripe_charge_id text,
  created_at timestamptz not null default now(),
  constraint stripe_invoice_payments_id_format check (id ~ '^[a-z]{2,8}_[A-Za-z0-9_]{1,250}$'),
  constraint stripe_invoice_payments_invoice_format check (invoice_id ~ '^in_[A-Za-z0-9_]{1,250}$'),
  constraint stripe_invoice_payments_names_payment check (
    stripe_payment_intent_id is not null or stripe_charge_id is not null
  )
);

create index stripe_invoice_payments_invoice_id_idx on billing.stripe_invoice_payments (invoice_id);

comment on table billing.stripe_invoice_payments is
'Which payment intent or charge paid an invoice, from invoice_payment.paid or the invoice''s '
'payments list; how refunds and disputes of subscription charges find the invoice they take from.';
comment on column billing.stripe_invoice_payments.id is
'The invoice payment (inpay_...), or the invoice id itself when read from an invoice.';
comment on column billing.stripe_invoice_payments.invoice_id is 'The invoice paid.';
comment on column billing.stripe_invoice_payments.stripe_payment_intent_id is 'The payment intent.';
comment on column billing.stripe_invoice_payments.stripe_charge_id is 'The charge, when named.';
comment on column billing.stripe_invoice_payments.created_at is 'When the link was recorded.';

alter table billing.stripe_invoice_payments enable row level security;
-- No policy: service role only.

revoke all on billing.stripe_invoice_payments from public, anon, authenticated, service_role;
grant select on billing.stripe_invoice_payments to service_role;

-- Payments, refunds, disputes, events: new columns ----------------------------------------------

alter table billing.stripe_payments
drop constraint stripe_payments_source_known,
add constraint stripe_payments_source_known check (
  (source = 'checkout_session' and id ~ '^cs_[A-Za-z0-9_]{1,250}$')
  or (source = 'invoice' and id ~ '^in_[A-Za-z0-9_]{1,250}$')
  or (source = 'payment_intent' and id ~ '^pi_[A-Za-z0-9_]{1,250}$')
),
add column refunded_reported_at timestamptz,
add column adjustments integer not null default 0,
add constraint stripe_payments_adjustments_not_negative check (adjustments >= 0);

comment on column billing.stripe_payments.source is 'checkout_session, invoice or payment_intent.';
comment on column billing.stripe_payments.refunded_cents is
'The cumulative amount_refunded of the latest charge.refunded event (by Stripe''s created).';
comment on column billing.stripe_payments.refunded_reported_at is
'Stripe''s created time of that event; refunds that failed after it are subtracted from it.';
comment on column billing.stripe_payments.tokens_clawed_back is
'Tokens currently debited for refunds: kind clawback, less clawback_reversed when a refund '
'failed or was canceled; from 0 up to tokens.';
comment on column billing.stripe_payments.adjustments is
'How many clawback or clawback_reversed entries the payment has had: the next one''s key suffix.';

alter table billing.stripe_refunds
add column last_event_created timestamptz,
add column updated_at timestamptz not null default now();

comment on column billing.stripe_refunds.status is
'Stripe''s refund status as of last_event_created: failed and canceled refunds are not counted.';
comment on column billing.stripe_refunds.last_event_created is
'Stripe''s created time of the event that set the status (null: recorded before 0.2).';
comment on column billing.stripe_refunds.updated_at is 'When the row last changed.';

alter table billing.stripe_disputes
add column adjustments integer not null default 0,
add constraint stripe_disputes_adjustments_not_negative check (adjustments >= 0);

comment on column billing.stripe_disputes.tokens_held is
'Tokens currently debited for the dispute: the disputed share of the payment''s tokens while '
'funds are withdrawn (needs_response, under_review) or lost, at most what refunds and other '
'disputes left; 0 for inquiries (warning_*), won and otherwise closed disputes.';
comment on column billing.stripe_disputes.adjustments is
'How many dispute or dispute_won entries the dispute has had since 0.2: the next key suffix.';

alter table billing.stripe_events
add column waiting_for text[];

create index stripe_events_waiting_for_idx on billing.stripe_events using gin (waiting_for)
where status = 'parked';

comment on column billing.stripe_events.waiting_for is
'For a parked event: the Stripe ids it names (its object, customer, subscription, invoice, '
'payment intent, charge). An event applied for any of them applies it in the same transaction.';

-- Recording what the service sells --------------------------------------------------------------

create function billing.record_stripe_sale(
  p_object jsonb,
  p_kind text,
  p_amount_field text
) returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_name text := 'p_payment_intent';
  v_type text := 'payment_intent';
  v_prefix text := '^pi_';
  v_id text := p_object ->> 'id';
  v_user_text text := p_object #>> '{metadata,user_id}';
  v_quantity_text text := coalesce(p_object #>> '{metadata,quantity}', '1');
  v_product billing.products;
  v_amount bigint;
  v_sale billing.stripe_sales;
  v_existing billing.stripe_sales;
begin
  if p_kind = 'checkout_session' then
    v_name := 'p_session';
    v_type := 'checkout.session';
    v_prefix := '^cs_';
  end if;
  if p_object is null or jsonb_typeof(p_object) <> 'object'
    or coalesce(p_object ->> 'object', '') <> v_type
    or v_id is null
    or v_id !~ v_prefix then
    raise exception using
      errcode = '22023',
      message = format('%s must be a Stripe %s object with its id, got %s', v_name, v_type,
        left(coalesce(p_object::text, 'null'), 200));
  end if;
  if v_user_text is null
    or v_user_text !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    raise exception using
      errcode = '22023',
      message = format('%s.metadata.user_id must be a user id, got %s', v_name,
        coalesce(quote_literal(v_user_text), 'null'));
  end if;
  if p_object ->> 'client_reference_id' is not null
    and p_object ->> 'client_reference_id' is distinct from v_user_text then
    raise exception using
      errcode = '22023',
      message = format('%s.client_reference_id %s differs from metadata.user_id %s', v_name,
        quote_literal(p_object ->> 'client_reference_id'), quote_literal(v_user_text));
  end if;
  select p.* into v_product from billing.products as p
  where p.code = p_object #>> '{metadata,product}';
  if not found or (p_kind = 'payment_intent' and v_product.kind <> 'pack') then
    raise exception using
      errcode = '22023',
      message = format('%s.metadata.product must be a %s in billing.products, got %s', v_name,
        case when p_kind = 'payment_intent' then 'pack' else 'product' end,
        coalesce(quote_literal(p_object #>> '{metadata,product}'), 'null'));
  end if;
  if v_quantity_text !~ '^[1-9][0-9]{0,5}$' then
    raise exception using
      errcode = '22023',
      message = format('%s.metadata.quantity must be a whole number from 1 to 999999, got %s',
        v_name, quote_literal(v_quantity_text));
  end if;
  v_amount := billing.stripe_bigint(p_object -> p_amount_field, v_name || '.' || p_amount_field);
  if v_amount is null or v_amount < 0 or coalesce(p_object ->> 'currency', '') !~ '^[A-Za-z]{3}$' then
    raise exception using
      errcode = '22023',
      message = format('%s must carry %s and currency, got %s and %s', v_name, p_amount_field,
        coalesce(p_object ->> p_amount_field, 'null'), coalesce(p_object ->> 'currency', 'null'));
  end if;

  perform billing.ensure_account(v_user_text::uuid);
  v_sale := row(
    v_id, p_kind, v_user_text::uuid, v_product.code, v_quantity_text::integer, v_amount,
    lower(p_object ->> 'currency'), coalesce((p_object ->> 'livemode')::boolean, false), now()
  )::billing.stripe_sales;

  insert into billing.stripe_sales as s
  select v_sale.*
  on conflict (id) do nothing;
  if found then
    return query select 'applied'::text, format('%s %s recorded: %s x %s for user %s (%s %s)',
      replace(p_kind, '_', ' '), v_id, v_product.code, v_sale.quantity, v_sale.user_id, v_amount,
      v_sale.currency);
    return;
  end if;

  select s.* into v_existing from billing.stripe_sales as s where s.id = v_id;
  if (v_existing.kind, v_existing.user_id, v_existing.product_code, v_existing.quantity,
      v_existing.amount_cents, v_existing.currency, v_existing.livemode)
    is distinct from (v_sale.kind, v_sale.user_id, v_sale.product_code, v_sale.quantity,
      v_sale.amount_cents, v_sale.currency, v_sale.livemode) then
    raise exception using
      errcode = 'TBSAL',
      message = format('%s %s was recorded with other values (%s x %s for user %s, %s %s)',
        replace(p_kind, '_', ' '), v_id, v_existing.product_code, v_existing.quantity,
        v_existing.user_id, v_existing.amount_cents, v_existing.currency);
  end if;
  return query select 'duplicate'::text, format('%s %s was already recorded',
    replace(p_kind, '_', ' '), v_id);
end;
$$;

comment on function billing.record_stripe_sale(jsonb, text, text) is
'Records a Checkout Session or PaymentIntent the service created (user, product, quantity, '
'amount, currency, livemode from the object as Stripe returned it). applied, or duplicate for '
'the same values; 22023 for an object that does not name what it sells, TBSAL for other values.';

revoke all on function billing.record_stripe_sale(jsonb, text, text) from public;

create function public.record_checkout_session(
  p_session jsonb
) returns table (status text, detail text)
language sql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
  select r.status, r.detail from billing.record_stripe_sale(p_session, 'checkout_session', 'amount_total') as r
$$;

comment on function public.record_checkout_session(jsonb) is
'Records a Checkout Session the service created, as Stripe returned it, before its URL is handed '
'out: its paid events credit metadata.quantity x metadata.product to metadata.user_id, when the '
'amount_total and currency paid are the recorded ones. Statuses: applied, duplicate. 22023 for a '
'session that does not name user, product, amount and currency; TBSAL for the same id with '
'other values.';

revoke all on function public.record_checkout_session(jsonb) from public, anon, authenticated;
grant execute on function public.record_checkout_session(jsonb) to service_role;

create function public.record_payment_intent(
  p_payment_intent jsonb
) returns table (status text, detail text)
language sql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
  select r.status, r.detail from billing.record_stripe_sale(p_payment_intent, 'payment_intent', 'amount') as r
$$;

comment on function public.record_payment_intent(jsonb) is
'Records a PaymentIntent for a pack the service created (Stripe''s Payment Element), as Stripe '
'returned it, before its client secret is handed out: payment_intent.succeeded credits it once. '
'Statuses: applied, duplicate. 22023 for an intent that does not name user, pack, amount and '
'currency; TBSAL for the same id with other values.';

revoke all on function public.record_payment_intent(jsonb) from public, anon, authenticated;
grant execute on function public.record_payment_intent(jsonb) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202200000', 'stripe_sales');
