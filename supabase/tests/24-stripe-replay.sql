-- Parked events, healing and replay: redelivery retries a parked event, the customer link applies
-- the events parked for want of it in the same transaction (oldest first, and the refund of the
-- purchase that applied), replay_parked_stripe_events() remains for the rest, and an event whose
-- effect fails stays parked.
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(24);

select tests.create_user('00000000-0000-0000-0000-000000000241', 'late@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000242', 'other@example.com');

update billing.products set stripe_price_id = 'price_000000000000000000000000'
where code = 'starter';
update billing.products set stripe_price_id = 'price_24_pack100'
where code = 'pack_100';

-- Test events come from tests.stripe_event() (tests/sql/pgtap_helpers.sql): a trimmed real payload
-- of tests/fixtures/stripe with its own id, type and created, and the patch it is given, which is
-- the whole of the adaptation (ids, user, product metadata, ...).

set local role service_role;

-- Four events for a customer nobody has linked yet -----------------------------------------------
-- Derived from the ruby-mock checkout.session.completed: a session the service did not create (a
-- Payment Link) whose one line item is pack_100's price, naming no user.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_24_checkout', 'checkout.session.completed', 1700000000,
    '{"id": "cs_24Late", "customer": "cus_24Late", "payment_intent": "pi_24Late", "amount_total": 500,
      "metadata": {},
      "line_items": {"data": [{"price": {"id": "price_24_pack100"}, "quantity": 1}]}}')))$$,
  $$values ('parked'::text, 'checkout session cs_24Late: no user: no client_reference_id nor metadata.user_id, '
    'customer cus_24Late is not linked (link_stripe_customer)'::text)$$,
  'a paid session of an unlinked customer should be parked'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_24_checkout', 'checkout.session.completed', 1700000000,
    '{"id": "cs_24Late", "customer": "cus_24Late", "payment_intent": "pi_24Late", "amount_total": 500,
      "metadata": {},
      "line_items": {"data": [{"price": {"id": "price_24_pack100"}, "quantity": 1}]}}')))$$,
  $$values ('parked'::text)$$,
  'a redelivered parked event should be tried again (and stay parked)'
);
select results_eq(
  $$select status, attempts from billing.stripe_events where id = 'evt_24_checkout'$$,
  $$values ('parked'::text, 2)$$,
  'each delivery of a parked event should count an attempt'
);
-- Derived from the openapi refund: half of that purchase refunded, before the purchase is known.
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'openapi-fixtures3/refund.json', 'evt_24_refund', 'refund.created', 1700000100,
    '{"id": "re_24Late", "amount": 250, "charge": "ch_24Late", "payment_intent": "pi_24Late"}'))$$,
  $$values ('parked'::text)$$,
  'a refund arriving before its purchase is recorded should be parked'
);
-- Derived from the ruby-mock subscription events: created active, then updated past_due.
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json',
    'evt_24_sub_created', 'customer.subscription.created', 1700000200,
    '{"id": "sub_24Late", "customer": "cus_24Late"}'))$$,
  $$values ('parked'::text)$$,
  'a subscription of an unlinked customer should be parked'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.updated.json',
    'evt_24_sub_updated', 'customer.subscription.updated', 1700000300,
    '{"id": "sub_24Late", "customer": "cus_24Late", "status": "past_due"}'))$$,
  $$values ('parked'::text)$$,
  'its update should be parked too'
);

-- Replay before anything changed: still parked.
select results_eq(
  $$select event_id, type, status from public.replay_parked_stripe_events()$$,
  $$values ('evt_24_checkout'::text, 'checkout.session.completed'::text, 'parked'::text),
    ('evt_24_refund', 'refund.created', 'parked'),
    ('evt_24_sub_created', 'customer.subscription.created', 'parked'),
    ('evt_24_sub_updated', 'customer.subscription.updated', 'parked')$$,
  'a replay with nothing resolved should leave every event parked, oldest first'
);
select results_eq(
  $$select attempts from billing.stripe_events where id = 'evt_24_checkout'$$,
  $$values (3)$$,
  'a replay should count an attempt'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000241'),
  100::bigint,
  'nothing should be credited while the events are parked'
);

-- The customer link appears: the parked events apply in the same transaction, oldest first.
select results_eq(
  $$select status from public.link_stripe_customer('00000000-0000-0000-0000-000000000241', 'cus_24Late')$$,
  $$values ('applied'::text)$$,
  'the service should link the customer'
);
select results_eq(
  $$select id, status, waiting_for from billing.stripe_events where id like 'evt_24_%'
    order by processed_at, created$$,
  $$values ('evt_24_checkout'::text, 'applied'::text, null::text[]),
    ('evt_24_refund', 'applied', null), ('evt_24_sub_created', 'applied', null),
    ('evt_24_sub_updated', 'applied', null)$$,
  'the link should apply every parked event, oldest first (the refund once its purchase applied)'
);
select results_eq(
  $$select kind, amount, idempotency_key from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000241' order by id$$,
  $$values ('signup'::text, 100::bigint, 'signup:00000000-0000-0000-0000-000000000241'::text),
    ('purchase', 100, 'stripe:checkout:cs_24Late'), ('clawback', -50, 'stripe:clawback:cs_24Late:n1')$$,
  'the healed purchase should be credited and the healed refund clawed back after it'
);
select results_eq(
  $$select plan, subscription_status from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000241'$$,
  $$values ('starter'::text, 'past_due'::text)$$,
  'the healed subscription events should leave the account as the newer one says'
);
select results_eq(
  $$select id, status, attempts from billing.stripe_events where id like 'evt_24_%' order by id$$,
  $$values ('evt_24_checkout'::text, 'applied'::text, 4), ('evt_24_refund', 'applied', 3),
    ('evt_24_sub_created', 'applied', 3), ('evt_24_sub_updated', 'applied', 3)$$,
  'healed events should be stored with their new status and attempts'
);
select is_empty(
  $$select * from public.replay_parked_stripe_events()$$,
  'a replay with nothing parked should return nothing'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_24_checkout', 'checkout.session.completed', 1700000000,
    '{"id": "cs_24Late", "customer": "cus_24Late", "payment_intent": "pi_24Late", "amount_total": 500,
      "metadata": {},
      "line_items": {"data": [{"price": {"id": "price_24_pack100"}, "quantity": 1}]}}')))$$,
  $$values ('duplicate'::text)$$,
  'a redelivery after the event healed should answer duplicate'
);

-- A replay that fails stays parked ---------------------------------------------------------------
select results_eq(
  $$select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_24_broken', 'checkout.session.completed', 1700000400,
    '{"id": "cs_24Broken", "customer": "cus_24Broken", "payment_intent": "pi_24Broken",
      "metadata": {},
      "line_items": {"data": [{"price": {"id": "price_24_pack100"}, "quantity": 1}]}}')))$$,
  $$values ('parked'::text)$$,
  'another unlinked session should be parked'
);
-- The owner wrote the session's ledger key by hand, for another user, dressed as a Stripe credit
-- (no caller of the RPCs can: add_tokens refuses stripe: keys with 22023).
reset role;
select results_eq(
  $$select status from billing.credit(
    '00000000-0000-0000-0000-000000000242', 100, 'stripe:checkout:cs_24Broken', 'purchase',
    null, null, '{"stripe_event_id": "evt_24_by_hand"}')$$,
  $$values ('applied'::text)$$,
  'a credit written by the owner should take the session''s ledger key for another user'
);
set local role service_role;
select results_eq(
  $$select status from public.link_stripe_customer('00000000-0000-0000-0000-000000000241', 'cus_24Broken')$$,
  $$values ('applied'::text)$$,
  'the customer should then be linked, even though healing its parked event fails'
);
select results_eq(
  $$select status, detail like 'healing failed: idempotency key%' from billing.stripe_events
    where id = 'evt_24_broken'$$,
  $$values ('parked'::text, true)$$,
  'an event whose effect raises while healing should stay parked with the error'
);
select results_eq(
  $$select event_id, status, detail like 'replay failed: TBKEY idempotency key%'
    from public.replay_parked_stripe_events()$$,
  $$values ('evt_24_broken'::text, 'parked'::text, true)$$,
  'a replay whose effect raises should leave the event parked with the error'
);
select is_empty(
  $$select 1 from billing.stripe_payments where id = 'cs_24Broken'$$,
  'a failed replay should leave no partial effect'
);
select results_eq(
  $$select status, attempts from billing.stripe_events where id = 'evt_24_broken'$$,
  $$values ('parked'::text, 3)$$,
  'the failed healing and replay should each be counted as an attempt'
);
reset role;

select tests.invariants_hold('the ledger invariants should hold after every replay');

select * from finish();
rollback;
