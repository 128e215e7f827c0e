-- Refunds and disputes: charge.refunded and refund.created claw back the refunded share once,
-- partial then full, into debt if need be; disputes hold tokens (a debit) and give them back when
-- won, keep them when lost.
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(50);

select tests.create_user('00000000-0000-0000-0000-000000000231', 'refund@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000232', 'debt@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000233', 'won@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000234', 'lost@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000235', 'early@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000236', 'partial@example.com');

-- Test events come from tests.stripe_event() (tests/sql/pgtap_helpers.sql): a trimmed real payload
-- of tests/fixtures/stripe with its own id, type and created, and the patch it is given, which is
-- the whole of the adaptation (ids, user, product metadata, ...).

-- A paid token-pack checkout, derived from the ruby-mock checkout.session.completed: session id,
-- payment intent, amount, user and product set. Returns the handler's status.
create function pg_temp.buy(
  p_suffix text, p_user_id uuid, p_product text, p_amount_cents bigint
) returns text
language sql
as $$
  select h.status from public.handle_stripe_event(tests.sold(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
    'evt_23_buy_' || p_suffix, 'checkout.session.completed', 1700000000,
    jsonb_build_object(
      'id', 'cs_23' || p_suffix, 'payment_intent', 'pi_23' || p_suffix,
      'amount_total', p_amount_cents, 'customer', 'cus_23' || p_suffix,
      'client_reference_id', p_user_id,
      'metadata', jsonb_build_object('user_id', p_user_id, 'product', p_product))
  ))) as h
$$;

-- charge.refunded derived from the ruby-mock one: the charge of a purchase, its cumulative
-- amount_refunded and the refunds it lists.
create function pg_temp.charge_refunded(
  p_event_id text, p_created bigint, p_suffix text, p_amount bigint, p_refunded bigint,
  p_refunds jsonb
) returns jsonb
language sql stable
as $$
  select tests.stripe_event('stripe-ruby-mock-webhook_fixtures/charge.refunded.json',
    p_event_id, 'charge.refunded', p_created,
    jsonb_build_object(
      'id', 'ch_23' || p_suffix, 'payment_intent', 'pi_23' || p_suffix, 'amount', p_amount,
      'amount_captured', p_amount, 'amount_refunded', p_refunded,
      'refunded', p_refunded = p_amount, 'refunds', jsonb_build_object('data', p_refunds)))
$$;

-- refund.created from the openapi refund object (envelope added): id, amount, purchase set.
create function pg_temp.refund_created(
  p_event_id text, p_created bigint, p_suffix text, p_refund_id text, p_amount bigint,
  p_status text default 'succeeded'
) returns jsonb
language sql stable
as $$
  select tests.stripe_event('openapi-fixtures3/refund.json', p_event_id, 'refund.created', p_created,
    jsonb_build_object(
      'id', p_refund_id, 'amount', p_amount, 'status', p_status,
      'charge', 'ch_23' || p_suffix, 'payment_intent', 'pi_23' || p_suffix))
$$;

-- Dispute events derived from the ruby-mock ones: dispute id, amount, status and purchase set.
create function pg_temp.dispute(
  p_fixture text, p_event_id text, p_type text, p_created bigint, p_dispute_id text,
  p_amount bigint, p_status text, p_purchase jsonb
) returns jsonb
language sql stable
as $$
  select tests.stripe_event('stripe-ruby-mock-webhook_fixtures/' || p_fixture || '.json',
    p_event_id, p_type, p_created,
    jsonb_build_object('id', p_dispute_id, 'amount', p_amount, 'status', p_status) || p_purchase)
$$;

set local role service_role;

-- Partial, then full refunds, described by both event types ---------------------------------------
select is(
  pg_temp.buy('R', '00000000-0000-0000-0000-000000000231', 'pack_600', 2000), 'applied',
  'the refund scenario should start with a purchase of 600 tokens for 2000 cents'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(
    pg_temp.refund_created('evt_23_re1', 1700001000, 'R', 're_23R1', 500))$$,
  $$values ('applied'::text, 'payment cs_23R: 500 of 2000 cents refunded, clawed back 150 tokens from user '
    '00000000-0000-0000-0000-000000000231 (balance 550)'::text)$$,
  'refund.created of a quarter of the payment should claw back a quarter of the tokens'
);
select results_eq(
  $$select kind, amount, idempotency_key from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000231' and kind = 'clawback'$$,
  $$values ('clawback'::text, -150::bigint, 'stripe:clawback:cs_23R:n1'::text)$$,
  'the clawback should be keyed on the payment and the cumulative tokens clawed back'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.charge_refunded(
    'evt_23_ch1', 1700001001, 'R', 2000, 500,
    '[{"id": "re_23R1", "object": "refund", "amount": 500, "status": "succeeded"}]'))$$,
  $$values ('duplicate'::text)$$,
  'charge.refunded describing the same refund should answer duplicate'
);
select results_eq(
  $$select status from public.handle_stripe_event(
    pg_temp.refund_created('evt_23_re1', 1700001000, 'R', 're_23R1', 500))$$,
  $$values ('duplicate'::text)$$,
  'a redelivered refund.created should answer duplicate'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000231'), 550::bigint,
  'one refund described three times should be clawed back once'
);
-- The second refund reaches us first through charge.refunded (cumulative 1000).
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.charge_refunded(
    'evt_23_ch2', 1700002001, 'R', 2000, 1000,
    '[{"id": "re_23R2", "object": "refund", "amount": 500, "status": "succeeded"},
      {"id": "re_23R1", "object": "refund", "amount": 500, "status": "succeeded"}]'))$$,
  $$values ('applied'::text, 'payment cs_23R: 1000 of 2000 cents refunded, clawed back 150 tokens from user '
    '00000000-0000-0000-0000-000000000231 (balance 400)'::text)$$,
  'a second partial refund should claw back only the newly refunded share'
);
select results_eq(
  $$select status from public.handle_stripe_event(
    pg_temp.refund_created('evt_23_re2', 1700002000, 'R', 're_23R2', 500))$$,
  $$values ('duplicate'::text)$$,
  'refund.created of a refund charge.refunded already counted should answer duplicate'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.charge_refunded(
    'evt_23_ch1_late', 1700001002, 'R', 2000, 500, '[]'))$$,
  $$values ('stale'::text, 'charge ch_23R: reports 500 cents refunded, 1000 were already reported'::text)$$,
  'an older charge.refunded (smaller cumulative amount) should be stale'
);
select results_eq(
  $$select status from public.handle_stripe_event(
    pg_temp.refund_created('evt_23_re_failed', 1700002500, 'R', 're_23Rfailed', 700, 'failed'))$$,
  $$values ('ignored'::text)$$,
  'a failed refund should be ignored'
);
-- The rest, refunded in full.
select results_eq(
  $$select status from public.handle_stripe_event(
    pg_temp.refund_created('evt_23_re3', 1700003000, 'R', 're_23R3', 1000))$$,
  $$values ('applied'::text)$$,
  'refunding the rest should be applied'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.charge_refunded(
    'evt_23_ch3', 1700003001, 'R', 2000, 2000, '[]'))$$,
  $$values ('duplicate'::text)$$,
  'charge.refunded of the full refund after refund.created should answer duplicate'
);
select results_eq(
  $$select amount, idempotency_key from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000231' and kind = 'clawback' order by id$$,
  $$values (-150::bigint, 'stripe:clawback:cs_23R:n1'::text), (-150, 'stripe:clawback:cs_23R:n2'),
    (-300, 'stripe:clawback:cs_23R:n3')$$,
  'partial then full refunds should claw back 150, 150 and 300 tokens: all 600, once each'
);
select results_eq(
  $$select refunded_cents, tokens_clawed_back from billing.stripe_payments where id = 'cs_23R'$$,
  $$values (2000::bigint, 600::bigint)$$,
  'the payment should record the full refund and all its tokens clawed back'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000231'), 100::bigint,
  'a fully refunded purchase should leave only the signup grant'
);

-- A refund after the tokens were spent: debt ----------------------------------------------------
select is(
  pg_temp.buy('D', '00000000-0000-0000-0000-000000000232', 'pack_100', 500), 'applied',
  'the debt scenario should start with a purchase of 100 tokens'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-000000000232', 150, 'use-23D')$$,
  $$values ('applied'::text, 50::bigint)$$,
  'the user should spend 150 of the 200 tokens'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.charge_refunded(
    'evt_23_debt', 1700004000, 'D', 500, 500,
    '[{"id": "re_23D1", "object": "refund", "amount": 500, "status": "succeeded"}]'))$$,
  $$values ('applied'::text)$$,
  'a full refund of spent tokens should still be applied'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000232'), -50::bigint,
  'clawing back spent tokens should drive the balance below zero (debt)'
);
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-000000000232', 1, 'use-23D-2')$$,
  $$values ('insufficient_funds'::text)$$,
  'usage should be refused while in debt'
);
select results_eq(
  $$select status, balance from public.add_tokens('00000000-0000-0000-0000-000000000232', 60, 'topup-23D')$$,
  $$values ('applied'::text, 10::bigint)$$,
  'a credit should pay off the debt first'
);

-- A refund of a payment we never recorded: the real fixture as it is.
select results_eq(
  $$select status, detail from public.handle_stripe_event(
    tests.stripe_fixture('stripe-ruby-mock-webhook_fixtures/charge.refunded.json'))$$,
  $$values ('parked'::text, 'charge ch_000000000000000000000000: no recorded payment with payment intent '
    '(none) or charge ch_000000000000000000000000'::text)$$,
  'a refund of an unknown payment should be parked'
);

-- A dispute won -----------------------------------------------------------------------------------
select is(
  pg_temp.buy('W', '00000000-0000-0000-0000-000000000233', 'pack_250', 1000), 'applied',
  'the won-dispute scenario should start with a purchase of 250 tokens'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.created', 'evt_23_dpW_created', 'charge.dispute.created', 1700005000,
    'dp_23W', 1000, 'needs_response', '{"charge": "ch_23W", "payment_intent": "pi_23W"}'))$$,
  $$values ('applied'::text, 'dispute dp_23W of payment cs_23W: 250 tokens of user '
    '00000000-0000-0000-0000-000000000233 held (debited) until it closes'::text)$$,
  'charge.dispute.created should hold the disputed tokens'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000233'), 100::bigint,
  'held tokens should leave the balance at once, so they cannot be spent'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.updated', 'evt_23_dpW_updated', 'charge.dispute.updated', 1700005100,
    'dp_23W', 1000, 'under_review', '{"charge": "ch_23W", "payment_intent": "pi_23W"}'))$$,
  $$values ('applied'::text)$$,
  'charge.dispute.updated should record the new status (funds still withdrawn: the same hold)'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.closed', 'evt_23_dpW_closed', 'charge.dispute.closed', 1700005200,
    'dp_23W', 1000, 'won', '{"charge": "ch_23W", "payment_intent": "pi_23W"}'))$$,
  $$values ('applied'::text, 'dispute dp_23W closed won: 250 tokens returned to user '
    '00000000-0000-0000-0000-000000000233'::text)$$,
  'a dispute won should give the tokens back'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.closed', 'evt_23_dpW_closed_again', 'charge.dispute.closed', 1700005300,
    'dp_23W', 1000, 'won', '{"charge": "ch_23W", "payment_intent": "pi_23W"}'))$$,
  $$values ('duplicate'::text)$$,
  'a second closing event for the same dispute should answer duplicate'
);
select results_eq(
  $$select kind, amount, idempotency_key from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000233' and kind like 'dispute%' order by id$$,
  $$values ('dispute'::text, -250::bigint, 'stripe:dispute:dp_23W:n1'::text),
    ('dispute_won', 250, 'stripe:dispute:dp_23W:n2')$$,
  'a won dispute should be a dispute debit and a dispute_won credit, once each'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000233'), 350::bigint,
  'after a won dispute the balance should be whole again'
);

-- A dispute lost ----------------------------------------------------------------------------------
select is(
  pg_temp.buy('L', '00000000-0000-0000-0000-000000000234', 'pack_100', 500), 'applied',
  'the lost-dispute scenario should start with a purchase of 100 tokens'
);
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-000000000234', 150, 'use-23L')$$,
  $$values ('applied'::text)$$,
  'the user should spend 150 tokens'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.created', 'evt_23_dpL_created', 'charge.dispute.created', 1700006000,
    'dp_23L', 500, 'needs_response', '{"charge": "ch_23L", "payment_intent": "pi_23L"}'))$$,
  $$values ('applied'::text)$$,
  'a dispute of spent tokens should be applied'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000234'), -50::bigint,
  'a dispute of spent tokens should drive the balance into debt'
);
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.closed', 'evt_23_dpL_closed', 'charge.dispute.closed', 1700006100,
    'dp_23L', 500, 'lost', '{"charge": "ch_23L", "payment_intent": "pi_23L"}'))$$,
  $$values ('applied'::text, 'dispute dp_23L lost: the 100 tokens of user '
    '00000000-0000-0000-0000-000000000234 stay debited'::text)$$,
  'a dispute lost should keep the tokens'
);
select results_eq(
  $$select resolution, status from billing.stripe_disputes where id = 'dp_23L'$$,
  $$values ('kept'::text, 'lost'::text)$$,
  'a lost dispute should be recorded as kept'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000234'), -50::bigint,
  'a lost dispute should credit nothing back'
);
select is_empty(
  $$select 1 from billing.ledger_entries
    where idempotency_key like 'stripe:dispute:dp_23L:%' and kind = 'dispute_won'$$,
  'a lost dispute should write no dispute_won entry'
);

-- Closed before its creation event arrived ---------------------------------------------------------
select is(
  pg_temp.buy('C', '00000000-0000-0000-0000-000000000235', 'pack_100', 500), 'applied',
  'the out-of-order dispute scenario should start with a purchase'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.closed', 'evt_23_dpC_closed', 'charge.dispute.closed', 1700007100,
    'dp_23C', 500, 'lost', '{"charge": "ch_23C", "payment_intent": "pi_23C"}'))$$,
  $$values ('applied'::text)$$,
  'a lost dispute seen first as closed should be applied'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.created', 'evt_23_dpC_created', 'charge.dispute.created', 1700007000,
    'dp_23C', 500, 'needs_response', '{"charge": "ch_23C", "payment_intent": "pi_23C"}'))$$,
  $$values ('stale'::text)$$,
  'its creation event arriving afterwards should be stale'
);
select results_eq(
  $$select amount, idempotency_key from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000235' and kind like 'dispute%'$$,
  $$values (-100::bigint, 'stripe:dispute:dp_23C:n1'::text)$$,
  'the lost dispute should be debited exactly once'
);

-- A dispute after a partial refund, naming only the charge ----------------------------------------
select is(
  pg_temp.buy('P', '00000000-0000-0000-0000-000000000236', 'pack_600', 2000), 'applied',
  'the partial scenario should start with a purchase of 600 tokens'
);
select results_eq(
  $$select status from public.handle_stripe_event(
    pg_temp.refund_created('evt_23_reP', 1700008000, 'P', 're_23P1', 1000))$$,
  $$values ('applied'::text)$$,
  'half of it should be refunded (300 tokens clawed back)'
);
-- The ruby-mock dispute as it is names only a charge (no payment intent), like older API versions.
select results_eq(
  $$select status, detail from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.created', 'evt_23_dpP_created', 'charge.dispute.created', 1700008100,
    'dp_23P', 2000, 'needs_response', '{"charge": "ch_23P"}'))$$,
  $$values ('applied'::text, 'dispute dp_23P of payment cs_23P: 300 tokens of user '
    '00000000-0000-0000-0000-000000000236 held (debited) until it closes'::text)$$,
  'a dispute naming only the charge should find the payment, and hold only what refunds left'
);
select results_eq(
  $$select status from public.handle_stripe_event(pg_temp.dispute(
    'charge.dispute.closed', 'evt_23_dpP_closed', 'charge.dispute.closed', 1700008200,
    'dp_23P', 2000, 'won', '{"charge": "ch_23P"}'))$$,
  $$values ('applied'::text)$$,
  'a dispute won should be applied'
);
select results_eq(
  $$select resolution from billing.stripe_disputes where id = 'dp_23P'$$,
  $$values ('returned'::text)$$,
  'a dispute won should give the tokens back'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000236'), 400::bigint,
  'after the refund and the won dispute the user should keep half the tokens plus the signup grant'
);
-- The real dispute fixture with an event id of its own (the ruby-mock fixtures share one): its
-- charge was never recorded.
select results_eq(
  $$select status, detail from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/charge.dispute.created.json',
    'evt_23_dp_unknown', 'charge.dispute.created', 1700009000))$$,
  $$values ('parked'::text, 'dispute dp_000000000000000000000000: no recorded payment with payment intent '
    '(none) or charge ch_000000000000000000000000'::text)$$,
  'a dispute of an unknown charge should be parked'
);
reset role;

select tests.invariants_hold('the ledger invariants should hold after every refund and dispute scenario');

select * from finish();
rollback;
