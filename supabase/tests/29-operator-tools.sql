-- What the operator's commands ask the database: stripe_events_unknown and stripe_credit_drift
-- (`stripe reconcile`), describe_user (`user`), list_parked_stripe_events (`events parked`),
-- mrr_report, token_flow_report, revenue_report and revenue_by_product (`report`),
-- billing.subscription_states.
-- Privileges first (every role), then refusals, then what each answers.
begin;
set local search_path = extensions, public;
select plan(49);

select tests.create_user('00000000-0000-0000-0000-0000000c0001', 'paid@example.com');

-- Privileges ----------------------------------------------------------------------------------
select function_privs_are(
  'public', 'stripe_events_unknown', array['jsonb'],
  'service_role', array['EXECUTE'], 'service_role should execute stripe_events_unknown'
);
select function_privs_are(
  'public', 'stripe_events_unknown', array['jsonb'],
  'anon', array[]::text[], 'anon should not execute stripe_events_unknown'
);
select function_privs_are(
  'public', 'stripe_events_unknown', array['jsonb'],
  'authenticated', array[]::text[], 'authenticated should not execute stripe_events_unknown'
);
select function_privs_are(
  'public', 'stripe_credit_drift', array['jsonb'],
  'service_role', array['EXECUTE'], 'service_role should execute stripe_credit_drift'
);
select function_privs_are(
  'public', 'stripe_credit_drift', array['jsonb'],
  'anon', array[]::text[], 'anon should not execute stripe_credit_drift'
);
select function_privs_are(
  'public', 'stripe_credit_drift', array['jsonb'],
  'authenticated', array[]::text[], 'authenticated should not execute stripe_credit_drift'
);

select function_privs_are(
  'public', 'describe_user', array['text'],
  'service_role', array['EXECUTE'], 'service_role should execute describe_user'
);
select function_privs_are(
  'public', 'describe_user', array['text'],
  'anon', array[]::text[], 'anon should not execute describe_user'
);
select function_privs_are(
  'public', 'describe_user', array['text'],
  'authenticated', array[]::text[], 'authenticated should not execute describe_user'
);
select function_privs_are(
  'public', 'list_parked_stripe_events', array['integer'],
  'service_role', array['EXECUTE'], 'service_role should execute list_parked_stripe_events'
);
select function_privs_are(
  'public', 'list_parked_stripe_events', array['integer'],
  'anon', array[]::text[], 'anon should not execute list_parked_stripe_events'
);
select function_privs_are(
  'public', 'list_parked_stripe_events', array['integer'],
  'authenticated', array[]::text[], 'authenticated should not execute list_parked_stripe_events'
);

select function_privs_are(
  'public', 'mrr_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'service_role', array['EXECUTE'], 'service_role should execute mrr_report'
);
select function_privs_are(
  'public', 'mrr_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'anon', array[]::text[], 'anon should not execute mrr_report'
);
select function_privs_are(
  'public', 'mrr_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'authenticated', array[]::text[], 'authenticated should not execute mrr_report'
);
select function_privs_are(
  'public', 'token_flow_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'service_role', array['EXECUTE'], 'service_role should execute token_flow_report'
);
select function_privs_are(
  'public', 'token_flow_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'anon', array[]::text[], 'anon should not execute token_flow_report'
);
select function_privs_are(
  'public', 'token_flow_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'authenticated', array[]::text[], 'authenticated should not execute token_flow_report'
);
select table_privs_are(
  'billing', 'subscription_states', 'service_role', array['SELECT'],
  'service_role should only read billing.subscription_states'
);
select table_privs_are(
  'billing', 'subscription_states', 'anon', array[]::text[],
  'anon should have no privilege on billing.subscription_states'
);
select table_privs_are(
  'billing', 'subscription_states', 'authenticated', array[]::text[],
  'authenticated should have no privilege on billing.subscription_states'
);
select ok(
  (
    select c.relrowsecurity from pg_class as c
    where c.oid = 'billing.subscription_states'::regclass
  ),
  'billing.subscription_states should have row level security on'
);

select function_privs_are(
  'public', 'revenue_report', array['timestamp with time zone', 'timestamp with time zone', 'text', 'text'],
  'service_role', array['EXECUTE'], 'service_role should execute revenue_report'
);
select function_privs_are(
  'public', 'revenue_report', array['timestamp with time zone', 'timestamp with time zone', 'text', 'text'],
  'anon', array[]::text[], 'anon should not execute revenue_report'
);
select function_privs_are(
  'public', 'revenue_report', array['timestamp with time zone', 'timestamp with time zone', 'text', 'text'],
  'authenticated', array[]::text[], 'authenticated should not execute revenue_report'
);
select function_privs_are(
  'public', 'revenue_by_product', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'service_role', array['EXECUTE'], 'service_role should execute revenue_by_product'
);
select function_privs_are(
  'public', 'revenue_by_product', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'anon', array[]::text[], 'anon should not execute revenue_by_product'
);
select function_privs_are(
  'public', 'revenue_by_product', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'authenticated', array[]::text[], 'authenticated should not execute revenue_by_product'
);

select function_privs_are(
  'public', 'payment_failure_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'service_role', array['EXECUTE'], 'service_role should execute payment_failure_report'
);
select function_privs_are(
  'public', 'payment_failure_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'anon', array[]::text[], 'anon should not execute payment_failure_report'
);
select function_privs_are(
  'public', 'payment_failure_report', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'authenticated', array[]::text[], 'authenticated should not execute payment_failure_report'
);

-- A paid pack, credited through the handler as the webhook would.
select is(
  (
    select status from public.handle_stripe_event(tests.sold(tests.stripe_event(
        'stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json',
        'evt_reconcile_paid', 'checkout.session.completed', 1700000000,
        '{"id": "cs_test_reconcile_paid", "payment_intent": "pi_reconcile_paid",
        "mode": "payment", "payment_status": "paid", "amount_total": 1000, "currency": "usd",
        "client_reference_id": "00000000-0000-0000-0000-0000000c0001",
        "metadata": {"user_id": "00000000-0000-0000-0000-0000000c0001",
                     "product": "pack_250", "quantity": "1"}}'
      )))
  ),
  'applied',
  'the purchase should be credited by the handler'
);

set local role service_role;

-- Planning ------------------------------------------------------------------------------------
-- A report estimates rows it cannot know; with JIT on, a loaded host compiled mrr_report for
-- seconds (a dashboard timed out). Every report turns JIT off for itself.
select is_empty(
  $$
    select p.proname from pg_proc as p
    where p.pronamespace = 'public'::regnamespace
      and p.proname in (
        'mrr_report', 'token_flow_report', 'revenue_report', 'revenue_by_product',
        'payment_failure_report'
      )
      and not coalesce('jit=off' = any(p.proconfig), false)
  $$,
  'every report should run with jit = off'
);

-- Refusals ------------------------------------------------------------------------------------
select throws_ok(
  $$select * from public.stripe_events_unknown('{"id": "evt_1"}')$$,
  '22023', 'p_event_ids must be a json array of Stripe event ids',
  'an object instead of an array of ids should be refused'
);
select throws_ok(
  $$select * from public.stripe_events_unknown(
    (select jsonb_agg('evt_' || n) from generate_series(1, 10001) as n))$$,
  '22023', 'p_event_ids holds 10001 ids; at most 10000 per call',
  'more ids than one call takes should be refused, naming the count'
);
select throws_ok(
  $$select * from public.stripe_credit_drift(null)$$,
  '22023', 'p_objects must be a json array of Stripe Checkout Sessions, PaymentIntents and invoices',
  'no objects should be refused'
);

-- What each answers ---------------------------------------------------------------------------
select results_eq(
  $$select event_id from public.stripe_events_unknown(
    '["evt_reconcile_paid", "evt_never_seen_2", "evt_never_seen_1", "evt_never_seen_1"]')$$,
  $$values ('evt_never_seen_1'), ('evt_never_seen_2')$$,
  'the ids never stored should come back once each, the stored one not at all'
);
select is_empty(
  $$select * from public.stripe_credit_drift(
    '[{"id": "cs_test_reconcile_paid", "object": "checkout.session", "mode": "payment",
       "payment_status": "paid", "amount_total": 1000, "currency": "USD",
       "metadata": {"product": "pack_250"}}]')$$,
  'a paid session credited for what was paid should not drift (currency case aside)'
);
select results_eq(
  $$select problem, paid_cents, credited_cents, detail from public.stripe_credit_drift(
    '[{"id": "cs_test_reconcile_paid", "object": "checkout.session", "mode": "payment",
       "payment_status": "paid", "amount_total": 1200, "currency": "usd",
       "metadata": {"product": "pack_250"}}]')$$,
  $$values (
    'amount_differs'::text, 1200::bigint, 1000::bigint,
    'stored payment cs_test_reconcile_paid credited 250 tokens'::text
  )$$,
  'a credit for less than Stripe says was paid should drift, saying what was credited'
);
select results_eq(
  $$select problem, credited_currency from public.stripe_credit_drift(
    '[{"id": "cs_test_reconcile_paid", "object": "checkout.session", "mode": "payment",
       "payment_status": "paid", "amount_total": 1000, "currency": "eur",
       "metadata": {"product": "pack_250"}}]')$$,
  $$values ('currency_differs'::text, 'usd'::text)$$,
  'a credit in another currency should drift'
);
select results_eq(
  $$select object_id, problem, detail from public.stripe_credit_drift(
    '[{"id": "cs_test_lost", "object": "checkout.session", "mode": "payment",
       "payment_status": "paid", "amount_total": 500, "currency": "usd",
       "metadata": {"product": "pack_100"}}]')$$,
  $$values ('cs_test_lost'::text, 'not_credited'::text, 'no stored event credited it'::text)$$,
  'a paid session of ours without a credit should drift as not_credited'
);
select is_empty(
  $$select * from public.stripe_credit_drift(
    '[{"id": "cs_test_unpaid", "object": "checkout.session", "mode": "payment",
       "payment_status": "unpaid", "amount_total": 500, "currency": "usd",
       "metadata": {"product": "pack_100"}},
      {"id": "cs_test_tshirt", "object": "checkout.session", "mode": "payment",
       "payment_status": "paid", "amount_total": 2500, "currency": "usd",
       "metadata": {"sku": "tshirt"}},
      {"id": "in_not_ours", "object": "invoice", "status": "paid", "amount_paid": 900,
       "currency": "usd", "lines": {"data": [{"price": {"id": "price_not_ours"}}]}},
      {"id": "in_zero", "object": "invoice", "status": "paid", "amount_paid": 0,
       "currency": "usd", "lines": {"data": []}}]')$$,
  'unpaid sessions, other products of the account and invoices of no plan should not drift'
);
select throws_ok(
  $$select * from public.describe_user('')$$,
  '22023', 'p_user must be a user id or an email address',
  'describe_user should refuse an empty user'
);
select is(
  (select report -> 'account' ->> 'balance' from public.describe_user('PAID@example.com')),
  '350',
  'describe_user should find a user by email, whatever its case, with the account'
);
select is_empty(
  $$select * from public.describe_user('00000000-0000-0000-0000-0000000c0999')$$,
  'describe_user should answer no row for an unknown user'
);
select throws_ok(
  $$select * from public.list_parked_stripe_events(0)$$,
  '22023', 'p_limit must be between 1 and 10000, got 0',
  'list_parked_stripe_events should refuse a limit of 0'
);
reset role;

-- The failed-payment rate: invoice A fails twice in January and is paid then, B is paid in
-- January, C fails in February and is never paid.
insert into billing.stripe_events (id, type, created, payload, status, processed_at)
values
('evt_pf_a1', 'invoice.payment_failed', '2026-01-03', '{"data": {"object": {"id": "in_pfa"}}}', 'applied', now()),
('evt_pf_a2', 'invoice.payment_failed', '2026-01-05', '{"data": {"object": {"id": "in_pfa"}}}', 'applied', now()),
('evt_pf_c1', 'invoice.payment_failed', '2026-02-10', '{"data": {"object": {"id": "in_pfc"}}}', 'parked', now());
insert into billing.stripe_payments (
  id, source, user_id, product_code, quantity, tokens, amount_paid_cents, currency, paid_at
)
values
('in_pfa', 'invoice', '00000000-0000-0000-0000-0000000c0001', 'starter', 1, 5000, 2900, 'usd', '2026-01-07'),
('in_pfb', 'invoice', '00000000-0000-0000-0000-0000000c0001', 'starter', 1, 5000, 2900, 'usd', '2026-01-20');
set local role service_role;
select results_eq(
  $$select period_start, invoices, failed, recovered, failure_rate_bp
    from public.payment_failure_report('2026-01-01', '2026-03-01')$$,
  $$values
    ('2026-01-01 00:00+00'::timestamptz, 2::bigint, 1::bigint, 1::bigint, 5000::bigint),
    ('2026-02-01 00:00+00'::timestamptz, 1::bigint, 1::bigint, 0::bigint, 10000::bigint)$$,
  'an invoice counts once in the month of its first attempt: failed, recovered, and the rate'
);
select throws_ok(
  $$select * from public.payment_failure_report('2026-01-01', '2026-03-01', 'year')$$,
  '22023', 'p_granularity must be day, week or month, got ''year''',
  'payment_failure_report should refuse another granularity'
);
reset role;

select tests.invariants_hold('after reconcile''s reads: nothing changed');

select * from finish();
rollback;
