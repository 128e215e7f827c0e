-- Token packs through Stripe Checkout: every outcome of the checkout.session.* events, the two
-- events of one payment crediting once, redelivery, parking, and malformed events.
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(49);

select tests.create_user('00000000-0000-0000-0000-000000000211', 'ann@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000212', 'ben@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000213', 'cat@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000215', 'eve@example.com');

-- Test events come from tests.stripe_event() (tests/sql/pgtap_helpers.sql): a trimmed real payload
-- of tests/fixtures/stripe with its own id, type and created, and the patch it is given, which is
-- the whole of the adaptation (ids, user, product metadata, ...).

set local role service_role;

-- A paid card checkout ----------------------------------------------------------------------------
-- Derived from the ruby-mock checkout.session.completed: client_reference_id and metadata set the
-- way the service creates sessions (2 x pack_100).
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_paid', 'checkout.session.completed', 1700000000,
    '{"id": "cs_test_21_paid", "payment_intent": "pi_21_paid",
      "client_reference_id": "00000000-0000-0000-0000-000000000211",
      "metadata": {"user_id": "00000000-0000-0000-0000-000000000211",
        "product": "pack_100", "quantity": "2"}}')))$$,
  $$values ('applied'::text,
    'credited 200 tokens (pack_100 x 2) to user 00000000-0000-0000-0000-000000000211 (balance 300)'::text)$$,
  'a paid checkout of 2 x pack_100 should credit 200 tokens'
);
select results_eq(
  $$select amount, kind, idempotency_key, metadata ->> 'stripe_event_id'
    from billing.ledger_entries where user_id = '00000000-0000-0000-0000-000000000211' order by id$$,
  $$values
    (100::bigint, 'signup'::text, 'signup:00000000-0000-0000-0000-000000000211'::text, null::text),
    (200, 'purchase', 'stripe:checkout:cs_test_21_paid', 'evt_21_paid')$$,
  'the credit should be one purchase entry keyed on the checkout session'
);
select results_eq(
  $$select expires_at from billing.credit_buckets as b
    join billing.ledger_entries as e on e.id = b.entry_id
    where e.idempotency_key = 'stripe:checkout:cs_test_21_paid'$$,
  $$values (null::timestamptz)$$,
  'purchased tokens should never expire'
);
select results_eq(
  $$select user_id, product_code, quantity, tokens, amount_paid_cents, currency,
      stripe_payment_intent_id, tokens_clawed_back
    from billing.stripe_payments where id = 'cs_test_21_paid'$$,
  $$values ('00000000-0000-0000-0000-000000000211'::uuid, 'pack_100'::text, 2, 200::bigint,
    3000::bigint, 'usd'::text, 'pi_21_paid'::text, 0::bigint)$$,
  'the payment should be remembered with its payment intent, amount and tokens for refunds'
);
select results_eq(
  $$select user_id from billing.customers where stripe_customer_id = 'cus_00000000000000'$$,
  $$values ('00000000-0000-0000-0000-000000000211'::uuid)$$,
  'the session''s customer should be linked to the user it named'
);
select results_eq(
  $$select type, status, attempts, created, api_version, livemode, payload ->> 'id'
    from billing.stripe_events where id = 'evt_21_paid'$$,
  $$values ('checkout.session.completed'::text, 'applied'::text, 1,
    to_timestamp(1700000000), '2020-08-27'::text, false, 'evt_21_paid'::text)$$,
  'the event should be stored with its outcome, created time and payload'
);

-- Redelivery and the second event of the same payment.
select results_eq(
  $$select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_paid', 'checkout.session.completed', 1700000000,
    '{"id": "cs_test_21_paid", "payment_intent": "pi_21_paid",
      "client_reference_id": "00000000-0000-0000-0000-000000000211",
      "metadata": {"product": "pack_100", "quantity": "2"}}')))$$,
  $$values ('duplicate'::text)$$,
  'a redelivered event should answer duplicate'
);
-- Derived: the same session as checkout.session.async_payment_succeeded (see the fixtures README).
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_paid_async', 'checkout.session.async_payment_succeeded', 1700000005,
    '{"id": "cs_test_21_paid", "payment_intent": "pi_21_paid",
      "client_reference_id": "00000000-0000-0000-0000-000000000211",
      "metadata": {"product": "pack_100", "quantity": "2"}}')))$$,
  $$select 'duplicate'::text, format('checkout session cs_test_21_paid was already credited (ledger entry %s)', id)
    from billing.ledger_entries where idempotency_key = 'stripe:checkout:cs_test_21_paid'$$,
  'async_payment_succeeded for a session already credited should answer duplicate'
);
select results_eq(
  $$select count(*)::int, sum(amount)::bigint from billing.ledger_entries
    where idempotency_key like 'stripe:checkout:cs_test_21_paid%'$$,
  $$values (1, 200::bigint)$$,
  'the two events of one payment and a redelivery should credit it exactly once'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000211'), 300::bigint,
  'the balance should hold the signup grant and one credit'
);
select results_eq(
  $$select id, status, attempts from billing.stripe_events
    where id in ('evt_21_paid', 'evt_21_paid_async') order by id$$,
  $$values ('evt_21_paid'::text, 'applied'::text, 1), ('evt_21_paid_async', 'duplicate', 1)$$,
  'each event should be stored once; a redelivery of a handled event should not count an attempt'
);

-- A delayed (SEPA-like) payment: completed unpaid, then async_payment_succeeded ------------------
-- Derived: payment_status unpaid, as the README says for delayed methods; user via metadata only.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_sepa_completed', 'checkout.session.completed', 1700000100,
    '{"id": "cs_test_21_sepa", "payment_intent": "pi_21_sepa", "payment_status": "unpaid",
      "customer": "cus_21Ben", "amount_total": 1000,
      "metadata": {"user_id": "00000000-0000-0000-0000-000000000212", "product": "pack_250"}}')))$$,
  $$values ('ignored'::text, 'checkout session cs_test_21_sepa completed with payment_status unpaid: '
    'nothing to credit until checkout.session.async_payment_succeeded'::text)$$,
  'an unpaid completed session should be ignored with the reason'
);
select is_empty(
  $$select 1 from billing.ledger_entries where idempotency_key = 'stripe:checkout:cs_test_21_sepa'$$,
  'an unpaid session should credit nothing'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_sepa_succeeded', 'checkout.session.async_payment_succeeded', 1700000200,
    '{"id": "cs_test_21_sepa", "payment_intent": "pi_21_sepa", "payment_status": "paid",
      "customer": "cus_21Ben", "amount_total": 1000,
      "metadata": {"user_id": "00000000-0000-0000-0000-000000000212", "product": "pack_250"}}')))$$,
  $$values ('applied'::text,
    'credited 250 tokens (pack_250 x 1) to user 00000000-0000-0000-0000-000000000212 (balance 350)'::text)$$,
  'async_payment_succeeded should credit the pack (quantity 1 when metadata has none)'
);
-- Derived: async_payment_failed (payment_status unpaid) and expired sessions.
select results_eq(
  $$select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_failed', 'checkout.session.async_payment_failed', 1700000300,
    '{"id": "cs_test_21_failed", "payment_status": "unpaid",
      "metadata": {"user_id": "00000000-0000-0000-0000-000000000212", "product": "pack_250"}}')))$$,
  $$values ('ignored'::text)$$,
  'async_payment_failed should be ignored'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_expired', 'checkout.session.expired', 1700000400,
    '{"id": "cs_test_21_expired", "status": "expired", "payment_status": "unpaid",
      "metadata": {"user_id": "00000000-0000-0000-0000-000000000212", "product": "pack_250"}}')))$$,
  $$values ('ignored'::text)$$,
  'an expired session should be ignored'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000212'), 350::bigint,
  'failed and expired sessions should credit nothing'
);

-- Finding the user ------------------------------------------------------------------------------
-- The unmodified fixture names no product: parked, with the reason.
select results_eq(
  $$select status, detail from public.handle_stripe_event(
    tests.stripe_fixture('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json'))$$,
  $$values ('parked'::text, 'checkout session cs_test_0000000000000000000000000000000000000000000000000000000000 '
    'was not recorded by the service (record_checkout_session) and has no '
    'single line item whose price is a pack''s stripe_price_id: not credited'::text)$$,
  'the real fixture (no product, no user) should be parked with the reason'
);
-- Derived: a product but no user, and a customer nobody linked.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_nouser', 'checkout.session.completed', 1700000500,
    '{"id": "cs_test_21_nouser", "customer": "cus_21Nobody", "metadata": {"product": "pack_100"}}')))$$,
  $$values ('parked'::text, 'checkout session cs_test_21_nouser '
    'was not recorded by the service (record_checkout_session) and has no '
    'single line item whose price is a pack''s stripe_price_id: not credited'::text)$$,
  'a paid session that names no user and whose customer is not linked should be parked'
);
select results_eq(
  $$select status, attempts from billing.stripe_events where id = 'evt_21_nouser'$$,
  $$values ('parked'::text, 1)$$,
  'a parked event should be stored with status parked'
);
select is_empty(
  $$select 1 from billing.stripe_payments where id = 'cs_test_21_nouser'$$,
  'a parked event should have no effect'
);
-- Derived: a session the service did not create (a Payment Link): its one line item's price is
-- pack_600's, and the user is found only through the customer link.
reset role;
update billing.products set stripe_price_id = 'price_21_pack600'
where code = 'pack_600';
set local role service_role;
select results_eq(
  $$select status from public.link_stripe_customer('00000000-0000-0000-0000-000000000213', 'cus_21Cat')$$,
  $$values ('applied'::text)$$,
  'the service should link the customer before checkout'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_linked', 'checkout.session.completed', 1700000600,
    '{"id": "cs_test_21_linked", "customer": "cus_21Cat", "payment_intent": "pi_21_linked",
      "metadata": {}, "line_items": {"data": [{"price": {"id": "price_21_pack600"}, "quantity": 3}]}}')))$$,
  $$values ('applied'::text,
    'credited 1800 tokens (pack_600 x 3) to user 00000000-0000-0000-0000-000000000213 (balance 1900)'::text)$$,
  'an unrecorded session with a pack''s price in its line items should credit the customer''s user'
);
-- Derived: a user who has no account yet (not in auth.users): the account is opened.
select results_eq(
  $$select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_newuser', 'checkout.session.completed', 1700000700,
    '{"id": "cs_test_21_newuser", "customer": "cus_21Dan", "payment_intent": "pi_21_newuser",
      "client_reference_id": "00000000-0000-0000-0000-000000000214",
      "metadata": {"user_id": "00000000-0000-0000-0000-000000000214", "product": "pack_100"}}')))$$,
  $$values ('applied'::text)$$,
  'a session for a user without an account should be applied'
);
select results_eq(
  $$select kind, amount from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000214' order by id$$,
  $$values ('signup'::text, 100::bigint), ('purchase', 100)$$,
  'the account should be opened (signup grant) and then credited'
);

-- Products and quantities -----------------------------------------------------------------------
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_plan_as_pack', 'checkout.session.completed', 1700000800,
    '{"id": "cs_test_21_plan", "client_reference_id": "00000000-0000-0000-0000-000000000211",
      "metadata": {"product": "starter"}}')))$$,
  $$values ('parked'::text, 'checkout session cs_test_21_plan '
    'was not recorded by the service (record_checkout_session) and has no '
    'single line item whose price is a pack''s stripe_price_id: not credited'::text)$$,
  'a payment-mode session for a plan should be parked'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_bad_quantity', 'checkout.session.completed', 1700000900,
    '{"id": "cs_test_21_quantity", "client_reference_id": "00000000-0000-0000-0000-000000000211",
      "metadata": {"product": "pack_100", "quantity": "-3"}}')))$$,
  $$values ('parked'::text, 'checkout session cs_test_21_quantity '
    'was not recorded by the service (record_checkout_session) and has no '
    'single line item whose price is a pack''s stripe_price_id: not credited'::text)$$,
  'a session with a bad quantity should be parked'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_bad_user', 'checkout.session.completed', 1700001000,
    '{"id": "cs_test_21_baduser", "client_reference_id": "ann",
      "metadata": {"product": "pack_100"}}')))$$,
  $$values ('parked'::text, 'checkout session cs_test_21_baduser '
    'was not recorded by the service (record_checkout_session) and has no '
    'single line item whose price is a pack''s stripe_price_id: not credited'::text)$$,
  'a session naming a user by something other than a uuid should be parked'
);
reset role;
update billing.products set active = false
where code = 'pack_250';
set local role service_role;
select results_eq(
  $$select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_21_retired', 'checkout.session.completed', 1700001100,
    '{"id": "cs_test_21_retired", "payment_intent": "pi_21_retired", "customer": "cus_21Retired",
      "client_reference_id": "00000000-0000-0000-0000-000000000212",
      "metadata": {"user_id": "00000000-0000-0000-0000-000000000212", "product": "pack_250"}}')))$$,
  $$values ('applied'::text)$$,
  'a paid session for a pack retired since checkout should still be credited'
);
select results_eq(
  $$select count(*)::int from billing.stripe_payments
    where user_id = '00000000-0000-0000-0000-000000000211'$$,
  $$values (1)$$,
  'parked sessions should leave no payment behind'
);

-- Subscription and setup checkouts --------------------------------------------------------------
-- Derived from pay-rails' data-only subscription-mode session (envelope added), user named.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/checkout.session.completed.json',
    'evt_21_subscription', 'checkout.session.completed', 1700001200,
    '{"client_reference_id": "00000000-0000-0000-0000-000000000215"}'))$$,
  $$values ('applied'::text, 'checkout session cs_test_a1UejXx8ebIdTzFolicVypUAZpOBVkoQKDbaarXoPlPVtj8p0zujPEEhjT: '
    'customer cus_M5wW9RPFk9xNZ5 linked to user 00000000-0000-0000-0000-000000000215; its invoices grant '
    'the plan tokens'::text)$$,
  'a subscription checkout should link its customer to the user'
);
select results_eq(
  $$select user_id from billing.customers where stripe_customer_id = 'cus_M5wW9RPFk9xNZ5'$$,
  $$values ('00000000-0000-0000-0000-000000000215'::uuid)$$,
  'the subscription''s customer should now belong to the user'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000215'), 100::bigint,
  'a subscription checkout should credit nothing itself (the invoice grants)'
);
-- The fixture as it is (envelope only added): no user, customer not linked.
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/checkout.session.completed.json',
    'evt_21_subscription_nouser', 'checkout.session.completed', 1700001300,
    '{"customer": "cus_21Unlinked"}'))$$,
  $$values ('parked'::text)$$,
  'a subscription checkout with no user should be parked'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.setup_mode.json',
    'evt_21_setup', 'checkout.session.completed', 1700001400))$$,
  $$values ('ignored'::text)$$,
  'a setup-mode checkout should be ignored'
);

-- Unhandled types -------------------------------------------------------------------------------
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/charge.succeeded.json',
    'evt_21_charge_succeeded', 'charge.succeeded', 1700001500))$$,
  $$values ('ignored'::text, 'charge.succeeded events are not handled'::text)$$,
  'an unhandled event type should be ignored'
);
select results_eq(
  $$select status, type from billing.stripe_events where id = 'evt_21_charge_succeeded'$$,
  $$values ('ignored'::text, 'charge.succeeded'::text)$$,
  'an ignored event should still be stored'
);

-- Malformed events: 22023, nothing stored --------------------------------------------------------
reset role;
create temp table events_before on commit drop as select count(*) as n from billing.stripe_events;
grant select on events_before to service_role;
set local role service_role;
select throws_ok(
  $$select * from public.handle_stripe_event(null)$$,
  '22023', 'p_event must be a Stripe event (a JSON object), got null',
  'a null event should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event('[1, 2]')$$,
  '22023', 'p_event must be a Stripe event (a JSON object), got array',
  'an array should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event(
    tests.stripe_event('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
      'x', 'x', 1) - 'id')$$,
  '22023', 'p_event.id must be a non-empty string of at most 255 characters (evt_...)',
  'an event without id should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event(jsonb_set(
    tests.stripe_event('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
      'evt_21_numeric_id', 'checkout.session.completed', 1), '{id}', '42'))$$,
  '22023', 'p_event.id must be a non-empty string of at most 255 characters (evt_...)',
  'an event whose id is not a string should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event(
    tests.stripe_event('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
      'evt_21_no_type', 'x', 1) - 'type')$$,
  '22023', 'p_event.type of event evt_21_no_type must be a non-empty string',
  'an event without type should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event(
    tests.stripe_event('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
      'evt_21_no_created', 'checkout.session.completed', 1) - 'created')$$,
  '22023', 'p_event.created of event evt_21_no_created must be a Unix timestamp',
  'an event without created should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event(
    '{"id": "evt_21_no_object", "object": "event", "type": "checkout.session.completed",
      "created": 1700000000, "data": {}}')$$,
  '22023', 'p_event.data.object of event evt_21_no_object must be a JSON object',
  'an event without data.object should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event(
    '{"id": "evt_21_thin", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered",
      "created": "2024-09-17T06:20:52.246Z",
      "related_object": {"id": "mtr_1", "type": "billing.meter", "url": "/v1/billing/meters/mtr_1"}}')$$,
  '22023', 'p_event evt_21_thin is a thin (v2) event, which carries no object: not supported',
  'a thin (v2) event should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event(jsonb_set(
    tests.stripe_event('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
      'evt_21_wrong_object', 'invoice.paid', 1700000000), '{data,object,object}', '"checkout.session"'))$$,
  '22023', 'p_event.data.object of invoice.paid event evt_21_wrong_object must be a invoice with an id, '
  'got ''checkout.session'' ''cs_test_0000000000000000000000000000000000000000000000000000000000''',
  'an event whose object does not match its type should raise 22023'
);
select throws_ok(
  $$select * from public.handle_stripe_event(
    tests.stripe_event('stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
      'evt_21_no_session_id', 'checkout.session.completed', 1700000000) #- '{data,object,id}')$$,
  '22023', null,
  'a handled event whose object has no id should raise 22023'
);
select results_eq(
  $$select count(*) from billing.stripe_events$$,
  $$select n from events_before$$,
  'malformed events should store nothing'
);
reset role;

select tests.invariants_hold('the ledger invariants should hold after every checkout scenario');

select * from finish();
rollback;
