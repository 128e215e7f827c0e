-- Subscriptions: customer.subscription.* (plan and status, stale events), invoice grants in both
-- invoice shapes (before and after API 2025-03-31), invoice.payment_failed, cancellation.
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(48);

select tests.create_user('00000000-0000-0000-0000-000000000221', 'sue@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000222', 'bas@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000223', 'meta@example.com');

-- The plans' Stripe prices: the ruby-mock fixtures' price for starter, pay-rails' for pro.
update billing.products set stripe_price_id = 'price_000000000000000000000000'
where code = 'starter';
update billing.products set stripe_price_id = 'price_1234'
where code = 'pro';

-- Test events come from tests.stripe_event() (tests/sql/pgtap_helpers.sql): a trimmed real payload
-- of tests/fixtures/stripe with its own id, type and created, and the patch it is given, which is
-- the whole of the adaptation (ids, user, product metadata, ...).

-- A subscription invoice before API 2025-03-31, derived from the ruby-mock
-- invoice.payment_succeeded (a manual invoice): billing_reason, subscription and the line's type
-- and period set as Stripe sends them for a subscription; each invoice its own payment intent and
-- charge (pi_/ch_ + the invoice id's suffix).
create function pg_temp.legacy_invoice(
  p_event_id text, p_type text, p_created bigint, p_invoice_id text, p_reason text,
  p_subscription text, p_period_end bigint
) returns jsonb
language sql stable
as $$
  select jsonb_set(
    jsonb_set(
      tests.stripe_event('stripe-ruby-mock-webhook_fixtures/invoice.payment_succeeded.json',
        p_event_id, p_type, p_created,
        jsonb_build_object(
          'id', p_invoice_id, 'billing_reason', p_reason, 'subscription', p_subscription,
          'payment_intent', 'pi_' || substr(p_invoice_id, 4), 'charge', 'ch_' || substr(p_invoice_id, 4))),
      '{data,object,lines,data,0,type}', '"subscription"'),
    '{data,object,lines,data,0,period}',
    jsonb_build_object('start', p_period_end - 2592000, 'end', p_period_end))
$$;

-- A paid subscription invoice from API 2025-03-31 on (basil), derived from pay-rails'
-- invoice.payment_failed (data only): envelope added, status paid, amount_paid set.
create function pg_temp.basil_invoice(
  p_event_id text, p_type text, p_created bigint, p_patch jsonb default '{}'
) returns jsonb
language sql stable
as $$
  select tests.stripe_event('pay-rails-stripe/invoice.payment_failed.json', p_event_id, p_type, p_created,
    tests.merge('{"status": "paid", "amount_paid": 24900}', p_patch))
$$;

set local role service_role;

-- Before 2025-03-31: a subscription's life -------------------------------------------------------
-- Derived: the subscription carries metadata.user_id, as the service creates it.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json',
    'evt_22_created', 'customer.subscription.created', 1700100000,
    '{"metadata": {"user_id": "00000000-0000-0000-0000-000000000221"}}'))$$,
  $$values ('applied'::text, 'subscription sub_000000000000000000000000 of user '
    '00000000-0000-0000-0000-000000000221: active on plan starter'::text)$$,
  'customer.subscription.created should be applied'
);
select results_eq(
  $$select user_id, stripe_customer_id, product_code, stripe_price_id, status, current_period_start,
      current_period_end, last_event_id, last_event_created
    from billing.subscriptions where id = 'sub_000000000000000000000000'$$,
  $$values ('00000000-0000-0000-0000-000000000221'::uuid, 'cus_00000000000000'::text, 'starter'::text,
    'price_000000000000000000000000'::text, 'active'::text, to_timestamp(1648320110),
    to_timestamp(1650998510), 'evt_22_created'::text, to_timestamp(1700100000))$$,
  'the subscription should be recorded with its plan, status, period (pre-basil: on the subscription) and watermark'
);
select results_eq(
  $$select plan, subscription_status from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000221'$$,
  $$values ('starter'::text, 'active'::text)$$,
  'the account should be on the starter plan, active'
);
select results_eq(
  $$select user_id from billing.customers where stripe_customer_id = 'cus_00000000000000'$$,
  $$values ('00000000-0000-0000-0000-000000000221'::uuid)$$,
  'the subscription''s customer should be linked from its metadata'
);

select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.legacy_invoice(
    'evt_22_inv1_succeeded', 'invoice.payment_succeeded', 1700100010,
    'in_000000000000000000000000', 'subscription_create', 'sub_000000000000000000000000', 1900000000))$$,
  $$values ('applied'::text, 'granted 5000 tokens of plan starter to user 00000000-0000-0000-0000-000000000221, '
    'expiring 2030-03-17 17:46:40+00 (balance 5100)'::text)$$,
  'a paid subscription_create invoice (pre-basil shape) should grant the plan''s tokens'
);
select results_eq(
  $$select e.kind, e.amount, b.expires_at from billing.ledger_entries as e
    join billing.credit_buckets as b on b.entry_id = e.id
    where e.idempotency_key = 'stripe:invoice:in_000000000000000000000000'$$,
  $$values ('subscription'::text, 5000::bigint, to_timestamp(1900000000))$$,
  'the grant should be a subscription credit expiring at the line''s period end'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.legacy_invoice(
    'evt_22_inv1_paid', 'invoice.paid', 1700100011,
    'in_000000000000000000000000', 'subscription_create', 'sub_000000000000000000000000', 1900000000))$$,
  $$values ('duplicate'::text)$$,
  'invoice.paid for an invoice already granted should answer duplicate'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.legacy_invoice(
    'evt_22_inv1_succeeded', 'invoice.payment_succeeded', 1700100010,
    'in_000000000000000000000000', 'subscription_create', 'sub_000000000000000000000000', 1900000000))$$,
  $$values ('duplicate'::text)$$,
  'a redelivered invoice event should answer duplicate'
);
select results_eq(
  $$select count(*)::int from billing.ledger_entries
    where idempotency_key like 'stripe:invoice:in_000000000000000000000000%'$$,
  $$values (1)$$,
  'both invoice events and a redelivery should grant once'
);

-- Out of order: the newer update arrives first.
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json',
    'evt_22_past_due', 'customer.subscription.updated', 1700100300,
    '{"id": "sub_000000000000000000000000", "status": "past_due"}'))$$,
  $$values ('applied'::text)$$,
  'a newer customer.subscription.updated should be applied'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json',
    'evt_22_active_late', 'customer.subscription.updated', 1700100200,
    '{"id": "sub_000000000000000000000000", "status": "active"}'))$$,
  $$values ('stale'::text, 'subscription sub_000000000000000000000000: event of 2023-11-16 02:03:20+00 is older '
    'than the last applied (2023-11-16 02:05:00+00)'::text)$$,
  'an older customer.subscription.updated arriving late should be stale'
);
select results_eq(
  $$select s.status, s.last_event_id, a.plan, a.subscription_status
    from billing.subscriptions as s join billing.accounts as a on a.user_id = s.user_id
    where s.id = 'sub_000000000000000000000000'$$,
  $$values ('past_due'::text, 'evt_22_past_due'::text, 'starter'::text, 'past_due'::text)$$,
  'a stale event should change neither the subscription nor the account'
);
select results_eq(
  $$select status from billing.stripe_events where id = 'evt_22_active_late'$$,
  $$values ('stale'::text)$$,
  'a stale event should be stored as stale'
);

select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.legacy_invoice(
    'evt_22_inv2', 'invoice.paid', 1700100400,
    'in_22cycle2', 'subscription_cycle', 'sub_000000000000000000000000', 1902592000))$$,
  $$values ('applied'::text)$$,
  'a renewal (subscription_cycle) invoice should grant the next period''s tokens'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000221'), 10100::bigint,
  'two periods should have granted 2 x 5000 on top of the signup grant'
);

select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.deleted.json',
    'evt_22_deleted', 'customer.subscription.deleted', 1700100500))$$,
  $$values ('applied'::text)$$,
  'customer.subscription.deleted should be applied'
);
select results_eq(
  $$select s.status, a.plan, a.subscription_status
    from billing.subscriptions as s join billing.accounts as a on a.user_id = s.user_id
    where s.id = 'sub_000000000000000000000000'$$,
  $$values ('canceled'::text, 'free'::text, 'canceled'::text)$$,
  'a deleted subscription should put the account back on the free plan, canceled'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.legacy_invoice(
    'evt_22_inv_after_cancel', 'invoice.paid', 1700100600,
    'in_22aftercancel', 'subscription_cycle', 'sub_000000000000000000000000', 1905184000))$$,
  $$values ('applied'::text, 'granted 5000 tokens of plan starter to user '
    '00000000-0000-0000-0000-000000000221, expiring 2030-05-16 17:46:40+00 (balance 15100)'::text)$$,
  'a paid invoice delivered after the subscription''s deletion should still grant its period (it was paid)'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json',
    'evt_22_update_before_delete', 'customer.subscription.updated', 1700100450))$$,
  $$values ('stale'::text)$$,
  'an update older than the deletion should be stale and not revive the plan'
);
select results_eq(
  $$select balance, plan from billing.accounts where user_id = '00000000-0000-0000-0000-000000000221'$$,
  $$values (15100::bigint, 'free'::text)$$,
  'after cancellation the plan should stay free; only the paid invoice added its period''s tokens'
);

-- Invoices that grant nothing.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/invoice.paid.json', 'evt_22_manual', 'invoice.paid', 1700100700))$$,
  $$values ('ignored'::text, 'invoice in_000000000000000000000000 (billing_reason manual): only '
    'subscription_create and subscription_cycle invoices grant plan tokens (and subscription_update '
    'ones, for plan changes)'::text)$$,
  'a manual invoice (the real invoice.paid fixture) should be ignored'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.legacy_invoice(
    'evt_22_update_new_period', 'invoice.paid', 1700100800,
    'in_22proration', 'subscription_update', 'sub_000000000000000000000000', 1902592000))$$,
  $$values ('applied'::text)$$,
  'a subscription_update invoice with a full-period (non-proration) plan line should grant that period'
);

-- From 2025-03-31 (basil): prices and periods moved ------------------------------------------------
-- pay-rails' subscription.updated keeps the period on the item; its price is no plan of ours.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/subscription.updated.json', 'evt_22_basil_sub_unknown',
    'customer.subscription.updated', 1700150000))$$,
  $$values ('parked'::text, 'subscription sub_00000000000000: no item''s price is a plan''s stripe_price_id '
    '(prices: FFBEGINNER_00000000000000)'::text)$$,
  'a subscription whose price is no plan should be parked with the prices it has'
);
reset role;
insert into billing.products (code, kind, name, tokens, price_cents, stripe_price_id)
values ('team', 'plan', 'Team', 1000, 4900, 'FFBEGINNER_00000000000000');
set local role service_role;
select results_eq(
  $$select status from public.link_stripe_customer('00000000-0000-0000-0000-000000000222', 'cus_1234')$$,
  $$values ('applied'::text)$$,
  'the service should link the basil customer'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/subscription.updated.json', 'evt_22_basil_sub',
    'customer.subscription.created', 1700150000,
    '{"id": "sub_22basil", "customer": "cus_1234", "status": "active"}'))$$,
  $$values ('applied'::text)$$,
  'a basil subscription event should be applied (user from the customer link)'
);
select results_eq(
  $$select user_id, product_code, status, current_period_start, current_period_end
    from billing.subscriptions where id = 'sub_22basil'$$,
  $$values ('00000000-0000-0000-0000-000000000222'::uuid, 'team'::text, 'active'::text,
    to_timestamp(1486568724), to_timestamp(1488987924))$$,
  'the basil period should be read from the subscription item'
);

select results_eq(
  $$select status, detail from public.handle_stripe_event(
    pg_temp.basil_invoice('evt_22_basil_paid', 'invoice.paid', 1700160000))$$,
  $$values ('applied'::text, 'granted 25000 tokens of plan pro to user 00000000-0000-0000-0000-000000000222, '
    'expiring 2026-04-23 18:45:06+00 (balance 25100)'::text)$$,
  'a basil invoice (pricing.price_details.price, parent.subscription_details) should grant the plan'
);
select results_eq(
  $$select e.amount, b.expires_at, e.metadata ->> 'stripe_subscription'
    from billing.ledger_entries as e join billing.credit_buckets as b on b.entry_id = e.id
    where e.idempotency_key = 'stripe:invoice:in_1234'$$,
  $$values (25000::bigint, to_timestamp(1776969906), 'sub_1234'::text)$$,
  'the basil grant should expire at the line''s period end and name the subscription'
);
select results_eq(
  $$select status from public.handle_stripe_event(
    pg_temp.basil_invoice('evt_22_basil_succeeded', 'invoice.payment_succeeded', 1700160001))$$,
  $$values ('duplicate'::text)$$,
  'invoice.payment_succeeded for the same basil invoice should answer duplicate'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(jsonb_set(
    pg_temp.basil_invoice('evt_22_basil_unknown_price', 'invoice.paid', 1700160100, '{"id": "in_22unknownprice"}'),
    '{data,object,lines,data,0,pricing,price_details,price}', '"price_unknown"'))$$,
  $$values ('parked'::text, 'invoice in_22unknownprice: no line''s price is a plan''s stripe_price_id '
    '(prices: price_unknown)'::text)$$,
  'an invoice whose price is no plan should be parked'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.basil_invoice(
    'evt_22_basil_metadata', 'invoice.paid', 1700160200,
    '{"id": "in_22metadata", "customer": "cus_22Unlinked", "parent": {"subscription_details":
      {"subscription": "sub_22metadata", "metadata": {"user_id": "00000000-0000-0000-0000-000000000223"}}}}'))$$,
  $$values ('applied'::text, 'granted 25000 tokens of plan pro to user 00000000-0000-0000-0000-000000000223, '
    'expiring 2026-04-23 18:45:06+00 (balance 25100)'::text)$$,
  'a basil invoice should find the user in the subscription metadata when the customer is unlinked'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.basil_invoice(
    'evt_22_basil_nouser', 'invoice.paid', 1700160300,
    '{"id": "in_22nouser", "customer": "cus_22Nobody",
      "parent": {"subscription_details": {"subscription": "sub_22nobody"}}}'))$$,
  $$values ('parked'::text, 'invoice in_22nouser: no user: no subscription metadata.user_id, customer '
    'cus_22Nobody is not linked (link_stripe_customer), subscription sub_22nobody is not recorded'::text)$$,
  'an invoice that cannot be tied to a user should be parked'
);

-- invoice.payment_failed (basil, pay-rails' real payload with an envelope).
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/invoice.payment_failed.json', 'evt_22_failed_early', 'invoice.payment_failed',
    1700200050))$$,
  $$values ('parked'::text)$$,
  'a payment failure of a subscription not recorded yet should be parked'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json',
    'evt_22_sub1234', 'customer.subscription.created', 1700200000,
    '{"id": "sub_1234", "customer": "cus_1234", "items": {"data": [{"price": {"id": "price_1234"}}]}}'))$$,
  $$values ('applied'::text)$$,
  'the pro subscription should be recorded'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/invoice.payment_failed.json', 'evt_22_failed', 'invoice.payment_failed',
    1700200100))$$,
  $$values ('applied'::text, 'subscription sub_1234 of user 00000000-0000-0000-0000-000000000222 is past_due '
    'after invoice in_1234 failed'::text)$$,
  'invoice.payment_failed for a renewal should make the subscription past_due'
);
select results_eq(
  $$select plan, subscription_status from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000222'$$,
  $$values ('pro'::text, 'past_due'::text)$$,
  'a past_due subscription should keep its plan (Stripe is retrying) and show past_due'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/invoice.payment_failed.json', 'evt_22_failed_old', 'invoice.payment_failed',
    1700199000))$$,
  $$values ('stale'::text)$$,
  'a payment failure older than the subscription''s last event should be stale'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json',
    'evt_22_sub1234_recovered', 'customer.subscription.updated', 1700200200,
    '{"id": "sub_1234", "customer": "cus_1234", "items": {"data": [{"price": {"id": "price_1234"}}]}}'))$$,
  $$values ('applied'::text)$$,
  'a later update (paid again) should be applied'
);
select results_eq(
  $$select plan, subscription_status from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000222'$$,
  $$values ('pro'::text, 'active'::text)$$,
  'the account should be active on pro again'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/invoice.payment_succeeded.json', 'evt_22_manual_failed',
    'invoice.payment_failed', 1700200300, '{"status": "open"}'))$$,
  $$values ('ignored'::text)$$,
  'a failed invoice that belongs to no subscription should be ignored'
);

-- Plans that roll over keep their tokens past the period.
reset role;
update billing.products set rollover = true
where code = 'pro';
set local role service_role;
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.basil_invoice(
    'evt_22_rollover', 'invoice.paid', 1700200400, '{"id": "in_22rollover"}'))$$,
  $$values ('applied'::text)$$,
  'a renewal of a rollover plan should be granted'
);
select results_eq(
  $$select b.expires_at from billing.ledger_entries as e
    join billing.credit_buckets as b on b.entry_id = e.id
    where e.idempotency_key = 'stripe:invoice:in_22rollover'$$,
  $$values (null::timestamptz)$$,
  'a rollover plan''s grant should never expire'
);

-- A subscription whose price has since left the catalog still ends.
reset role;
update billing.products set stripe_price_id = null
where code = 'team';
set local role service_role;
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/subscription.updated.json', 'evt_22_basil_sub_deleted',
    'customer.subscription.deleted', 1700250000,
    '{"id": "sub_22basil", "customer": "cus_1234"}'))$$,
  $$values ('applied'::text)$$,
  'deleting a subscription whose price is no longer in the catalog should be applied'
);
select results_eq(
  $$select s.status, s.product_code, a.plan, a.subscription_status
    from billing.subscriptions as s join billing.accounts as a on a.user_id = s.user_id
    where s.id = 'sub_22basil'$$,
  $$values ('canceled'::text, 'team'::text, 'pro'::text, 'active'::text)$$,
  'it should end on its recorded plan, and the account stay on its other, active subscription'
);

-- Subscription events that cannot be applied.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json',
    'evt_22_sub_nouser', 'customer.subscription.created', 1700300000,
    '{"id": "sub_22nouser", "customer": "cus_22Nobody"}'))$$,
  $$values ('parked'::text, 'subscription sub_22nouser: no user: no metadata.user_id, customer cus_22Nobody '
    'is not linked (link_stripe_customer), subscription sub_22nouser is not recorded'::text)$$,
  'a subscription that cannot be tied to a user should be parked'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json',
    'evt_22_sub_weird', 'customer.subscription.updated', 1700300100,
    '{"id": "sub_1234", "customer": "cus_1234", "status": "levitating"}'))$$,
  $$values ('parked'::text)$$,
  'a subscription status Stripe may add later should be parked, not guessed'
);
reset role;

select results_eq(
  $$select status, count(*)::int from billing.stripe_events where id like 'evt_22_%'
    group by status order by status$$,
  $$values ('applied'::text, 16), ('duplicate', 2), ('ignored', 2), ('parked', 5), ('stale', 3)$$,
  'every event should be stored once with its outcome'
);
select tests.invariants_hold('the ledger invariants should hold after every subscription scenario');

select * from finish();
rollback;
