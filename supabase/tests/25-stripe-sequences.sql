-- Stripe as it really sends, in SQL: a refund that fails gives back what it clawed (in both
-- orders of its two events), an inquiry holds nothing so a refund during it takes everything,
-- a cycle invoice after an upgrade grants the new plan from its non-proration line, the two
-- events of one second end in the state further along, and what was sold is checked. The
-- orders of every sequence, with duplicates and 8 concurrent deliveries, are in
-- tests/test_stripe_sequences.py.
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(16);

select tests.create_user('00000000-0000-0000-0000-000000000251', 'fay@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000252', 'gus@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000253', 'hal@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000254', 'ida@example.com');

update billing.products set stripe_price_id = 'price_25_starter'
where code = 'starter';
update billing.products set stripe_price_id = 'price_25_pro'
where code = 'pro';

set local role service_role;

-- A paid pack checkout the service sold (recorded first), derived from the ruby-mock
-- checkout.session.completed: 600 tokens for 2000 cents.
create function pg_temp.buy(p_suffix text, p_user_id uuid) returns text
language sql
as $$
  select h.status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_25_buy_' || p_suffix, 'checkout.session.completed', 1700000000,
    jsonb_build_object(
      'id', 'cs_25' || p_suffix, 'payment_intent', 'pi_25' || p_suffix, 'amount_total', 2000,
      'customer', 'cus_25' || p_suffix, 'client_reference_id', p_user_id,
      'metadata', jsonb_build_object('user_id', p_user_id, 'product', 'pack_600'))
  ))) as h
$$;

-- A refund event derived from the openapi refund: its id, amount, status and created.
create function pg_temp.refund(
  p_event_id text, p_type text, p_created bigint, p_suffix text, p_refund text, p_amount bigint,
  p_status text
) returns jsonb
language sql
as $$
  select tests.stripe_event('openapi-fixtures3/refund.json', p_event_id, p_type, p_created,
    jsonb_build_object('id', p_refund, 'amount', p_amount, 'status', p_status,
      'charge', 'ch_25' || p_suffix, 'payment_intent', 'pi_25' || p_suffix))
$$;

-- A refund that fails ---------------------------------------------------------------------------
select is(
  pg_temp.buy('F', '00000000-0000-0000-0000-000000000251'), 'applied',
  'the failing-refund scenario should start with a purchase of 600 tokens'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.refund(
    'evt_25_reF_pending', 'refund.created', 1700000100, 'F', 're_25F', 1000, 'pending'))$$,
  $$values ('applied'::text)$$,
  'a pending refund of half should claw back half the tokens at once'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.refund(
    'evt_25_reF_failed', 'refund.failed', 1700000200, 'F', 're_25F', 1000, 'failed'))$$,
  $$values ('applied'::text, 'payment cs_25F: 0 of 2000 cents refunded, gave back 300 tokens to user '
    '00000000-0000-0000-0000-000000000251 (balance 700)'::text)$$,
  'the refund failing should give back exactly what it clawed'
);
select results_eq(
  $$select kind, amount from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000251' and kind like 'clawback%' order by id$$,
  $$values ('clawback'::text, -300::bigint), ('clawback_reversed', 300)$$,
  'the give-back should be a ledger entry of its own (kind clawback_reversed)'
);
-- The other order: the failure first (newer), then the older pending state.
select is(
  pg_temp.buy('G', '00000000-0000-0000-0000-000000000252'), 'applied',
  'the second scenario should start with a purchase too'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.refund(
    'evt_25_reG_failed', 'refund.failed', 1700000200, 'G', 're_25G', 1000, 'failed'))$$,
  $$values ('ignored'::text)$$,
  'a refund first seen failed should claw back nothing'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.refund(
    'evt_25_reG_pending', 'refund.created', 1700000100, 'G', 're_25G', 1000, 'pending'))$$,
  $$values ('stale'::text)$$,
  'its older pending state arriving late should be stale'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000252'), 700::bigint,
  'in either order a failed refund should leave all 600 tokens'
);

-- An inquiry and a full refund ------------------------------------------------------------------
select is(
  pg_temp.buy('I', '00000000-0000-0000-0000-000000000253'), 'applied',
  'the inquiry scenario should start with a purchase'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/charge.dispute.created.json', 'evt_25_inquiry',
    'charge.dispute.created', 1700000100,
    '{"id": "dp_25I", "amount": 2000, "status": "warning_needs_response", "charge": "ch_25I",
      "payment_intent": "pi_25I"}'))$$,
  $$values ('applied'::text)$$,
  'an inquiry should be recorded'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000253'), 700::bigint,
  'an inquiry (no funds withdrawn) should hold nothing'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.refund(
    'evt_25_reI', 'refund.created', 1700000200, 'I', 're_25I', 2000, 'succeeded'))$$,
  $$values ('applied'::text)$$,
  'a full refund during the inquiry should claw back'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/charge.dispute.created.json', 'evt_25_inquiry_closed',
    'charge.dispute.closed', 1700000300,
    '{"id": "dp_25I", "amount": 2000, "status": "warning_closed", "charge": "ch_25I",
      "payment_intent": "pi_25I"}'))$$,
  $$values ('applied'::text)$$,
  'the inquiry closing should be recorded (and move no token: it held none)'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000253'), 100::bigint,
  'after a full refund during an inquiry the user should keep none of the 600 tokens'
);

-- A cycle invoice after an upgrade (prorations listed first) -------------------------------------
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/invoice.paid.json', 'evt_25_cycle', 'invoice.paid',
    1700000400,
    '{"id": "in_25cycle", "billing_reason": "subscription_cycle", "subscription": "sub_25U",
      "customer": "cus_25U", "amount_paid": 13400, "payment_intent": "pi_25cycle",
      "charge": "ch_25cycle",
      "subscription_details": {"metadata": {"user_id": "00000000-0000-0000-0000-000000000254"}},
      "lines": {"data": [
        {"amount": -1450, "quantity": 1, "proration": true, "price": {"id": "price_25_starter"},
          "period": {"start": 1901296000, "end": 1902592000}},
        {"amount": 4950, "quantity": 1, "proration": true, "price": {"id": "price_25_pro"},
          "period": {"start": 1901296000, "end": 1902592000}},
        {"amount": 9900, "quantity": 1, "proration": false, "price": {"id": "price_25_pro"},
          "period": {"start": 1902592000, "end": 1905184000}}]}}'))$$,
  $$values ('applied'::text, 'granted 25000 tokens of plan pro to user '
    '00000000-0000-0000-0000-000000000254, expiring 2030-05-16 17:46:40+00 (balance 25100)'::text)$$,
  'the cycle invoice after an upgrade should grant pro from its non-proration line, for its period'
);

reset role;
select tests.invariants_hold('the ledger invariants should hold after every sequence');

select * from finish();
rollback;
