-- The cost side and the operator's adjustments: provider costs on usage records (from the rate
-- card, rounded up, or from the caller), margin_report's figures and its attribution, the margin
-- floor's alert, adjust_tokens (credit, debit, debt only when allowed, idempotency), and the
-- business metrics' shape. Privileges are in 02-privileges.sql.
begin;
set local search_path = extensions, public;
select plan(34);

select tests.create_user('00000000-0000-0000-0000-0000000d0001', 'margin@example.com');
select tests.create_user('00000000-0000-0000-0000-0000000d0002', 'adjust@example.com');
select status from public.add_tokens('00000000-0000-0000-0000-0000000d0001', 100000, 'mg-fund');

insert into billing.meters (code, unit) values ('t.costed', 'unit'), ('t.uncosted', 'unit');
-- 1 token a unit; the provider charges 250 micro-cents per 1000 units.
insert into billing.prices (meter_code, scheme, unit_amount, cost_amount, cost_divisor, effective_from)
values ('t.costed', 'per_unit', 1, 250, 1000, '2026-01-01');
insert into billing.prices (meter_code, scheme, unit_amount, effective_from)
values ('t.uncosted', 'per_unit', 1, '2026-01-01');

-- Costs on usage records -------------------------------------------------------------------
set local role service_role;
select results_eq(
  $$select status, tokens from public.record_usage('00000000-0000-0000-0000-0000000d0001',
    '[{"meter": "t.costed", "quantity": 10},
      {"meter": "t.uncosted", "quantity": 5, "cost_microcents": 400000000},
      {"meter": "t.uncosted", "quantity": 1}]', 'mg-call-1')$$,
  $$values ('applied'::text, 16::bigint)$$,
  'record_usage should charge the tokens whatever the costs'
);
select results_eq(
  $$select line::int, cost_microcents, plan from billing.usage_records
    where idempotency_key = 'mg-call-1' order by line$$,
  $$values (1, 3::bigint, 'free'::text), (2, 400000000::bigint, 'free'), (3, null::bigint, 'free')$$,
  'each record should keep its cost (rate card: ceil(10 x 250 / 1000) = 3; the caller''s; unknown) and the plan'
);
select results_eq(
  $$select status from public.record_usage('00000000-0000-0000-0000-0000000d0001',
    '[{"meter": "t.costed", "quantity": 10},
      {"meter": "t.uncosted", "quantity": 5, "cost_microcents": 400000000},
      {"meter": "t.uncosted", "quantity": 1}]', 'mg-call-1')$$,
  $$values ('duplicate'::text)$$,
  'a retry with the same items and costs should answer duplicate'
);
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000d0001',
    '[{"meter": "t.costed", "quantity": 10},
      {"meter": "t.uncosted", "quantity": 5, "cost_microcents": 1},
      {"meter": "t.uncosted", "quantity": 1}]', 'mg-call-1')$$,
  'TBKEY', null, 'a retry with another cost should be refused with TBKEY'
);
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000d0001',
    '[{"meter": "t.costed", "quantity": 1, "cost_microcents": -1}]', 'mg-bad-cost')$$,
  '22023', 'p_items[0].cost_microcents must be an integer 0..10^15 (the provider''s cost)',
  'a negative cost should be refused, naming the item'
);
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000d0001',
    '[{"meter": "t.costed", "quantity": 1, "cost_microcents": 1.5}]', 'mg-bad-cost')$$,
  '22023', 'p_items[0].cost_microcents must be an integer 0..10^15 (the provider''s cost)',
  'a fractional cost should be refused'
);
select is(
  (
    select count(*)::int from billing.usage_records
    where idempotency_key = 'mg-bad-cost'
  ),
  0, 'a refused call should write no usage record'
);
select results_eq(
  $$select (i ->> 'cost_microcents')::bigint from public.quote_usage(
    '00000000-0000-0000-0000-0000000d0001', '[{"meter": "t.costed", "quantity": 4001}]') as q,
    jsonb_array_elements(q.items) as i$$,
  $$values (1001::bigint)$$,
  'quote_usage should give the cost too (ceil(4001 x 250 / 1000) = 1001)'
);
reset role;

-- Margin -------------------------------------------------------------------------------------
-- This month the user paid $10.00; usage cost 400,000,003 micro-cents ($4.00000003).
insert into billing.stripe_payments (
  id, source, user_id, product_code, quantity, tokens, amount_paid_cents, currency, paid_at
)
values (
  'cs_test_margin_1', 'checkout_session', '00000000-0000-0000-0000-0000000d0001', 'pack_250', 1,
  250, 1000, 'usd', now()
);
set local role service_role;
select results_eq(
  $$select plan, users, revenue_cents, cost_currency, cost_microcents, uncosted_records,
      tokens_used, margin_microcents, margin_bp
    from public.margin_report(date_trunc('month', now(), 'UTC'),
      date_trunc('month', now(), 'UTC') + interval '1 month', 'month', 'plan', 'usd')$$,
  $$values ('free'::text, 1::bigint, 1000::bigint, 'usd'::text, 400000003::bigint, 1::bigint,
      16::bigint, 599999997::bigint, 6000::bigint)$$,
  'margin per plan: revenue x 10^6 - cost, and 5999.99997 basis points rounded to 6000'
);
select results_eq(
  $$select user_id, plan, revenue_cents, cost_microcents
    from public.margin_report(date_trunc('month', now(), 'UTC'),
      date_trunc('month', now(), 'UTC') + interval '1 month', 'month', 'user')$$,
  $$values ('00000000-0000-0000-0000-0000000d0001'::uuid, 'free'::text, 1000::bigint, 400000003::bigint)$$,
  'margin per user should name the user and the plan'
);
select is_empty(
  $$select * from public.margin_report(date_trunc('month', now(), 'UTC'),
      date_trunc('month', now(), 'UTC') + interval '1 month', 'month', 'total', 'eur')$$,
  'nothing should be reported in a currency nobody paid in'
);
select throws_ok(
  $$select * from public.margin_report(now(), now() + interval '1 day', 'day', 'product')$$,
  '22023', 'p_group_by must be user, plan or total, got ''product''',
  'an unknown grouping should be refused'
);
select throws_ok(
  $$select * from public.margin_report(now(), now() - interval '1 day')$$,
  '22023', null, 'a period that ends before it starts should be refused'
);
select is_empty(
  $$select * from public.check_margin_floor(now())$$,
  'without a floor no plan should be under it'
);
reset role;
update billing.settings set margin_floor_bp = 7000;
set local role service_role;
select results_eq(
  $$select plan, currency, revenue_cents, cost_microcents, margin_bp, floor_bp
    from public.check_margin_floor(now())$$,
  $$values ('free'::text, 'usd'::text, 1000::bigint, 400000003::bigint, 6000::bigint, 7000)$$,
  'a plan under the floor should be named with its figures'
);
select results_eq(
  $$select count(*)::int, min(kind), min(subject), min((detail ->> 'margin_bp')::int)
    from public.list_alerts(10)$$,
  $$values (1, 'margin_below_floor'::text, 'free'::text, 6000)$$,
  'the breach should be an alert row'
);
select results_eq(
  $$select count(*)::int from public.check_margin_floor(now() - interval '1 second')$$,
  $$values (1)$$,
  'checking again should find the plan again'
);
select is(
  (select count(*)::int from billing.alerts), 1,
  'checking the same period again should not raise a second alert'
);
select throws_ok(
  $$select * from public.list_alerts(0)$$, '22023', null, 'a limit of 0 should be refused'
);
select throws_ok(
  $$insert into billing.alerts (kind, subject, period_start, currency)
    values ('margin_below_floor', 'x', now(), 'usd')$$,
  '42501', null, 'service_role should not write alerts directly'
);

-- Adjustments --------------------------------------------------------------------------------
select results_eq(
  $$select status, balance from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', 50,
    'goodwill for the outage', 'adj-1', false, 'ops@example.com')$$,
  $$values ('applied'::text, 150::bigint)$$,
  'a positive adjustment should credit'
);
select results_eq(
  $$select kind, amount, description, metadata ->> 'reason', metadata ->> 'operator'
    from billing.ledger_entries where idempotency_key = 'adj-1'$$,
  $$values ('adjustment'::text, 50::bigint, 'goodwill for the outage'::text,
    'goodwill for the outage'::text, 'ops@example.com'::text)$$,
  'the entry should be an adjustment carrying the reason and the operator'
);
select results_eq(
  $$select status, balance from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', 50,
    'goodwill for the outage', 'adj-1')$$,
  $$values ('duplicate'::text, 150::bigint)$$,
  'the same command again should answer duplicate and credit nothing'
);
select throws_ok(
  $$select * from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', 60, 'goodwill', 'adj-1')$$,
  'TBKEY', null, 'the key with another amount should be refused'
);
select throws_ok(
  $$select * from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', 0, 'nothing', 'adj-0')$$,
  '22023', null, 'a zero adjustment should be refused'
);
select throws_ok(
  $$select * from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', 5, '  ', 'adj-2')$$,
  '22023', 'p_reason must say why, in 3 to 500 characters', 'an adjustment without a reason should be refused'
);
select throws_ok(
  $$select * from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', 5, 'why', 'stripe:x')$$,
  '22023', null, 'a key of token-billing''s own namespaces should be refused'
);
select results_eq(
  $$select status, balance from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', -200,
    'take back the test grant', 'adj-3')$$,
  $$values ('insufficient_funds'::text, 150::bigint)$$,
  'a debit beyond what is available should be refused without --allow-debt'
);
select results_eq(
  $$select status, balance from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', -40,
    'charge the missed call', 'adj-4')$$,
  $$values ('applied'::text, 110::bigint)$$,
  'a debit within the balance should apply'
);
select results_eq(
  $$select status, balance from public.adjust_tokens('00000000-0000-0000-0000-0000000d0002', -200,
    'take back the test grant', 'adj-5', true)$$,
  $$values ('applied'::text, -90::bigint)$$,
  'with debt allowed the balance may go below zero'
);
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-0000000d0002', 1, 'adj-use')$$,
  $$values ('insufficient_funds'::text)$$,
  'usage should be refused while the account is in debt'
);
select results_eq(
  $$select status from public.add_tokens('00000000-0000-0000-0000-0000000d0002', 100, 'adj-topup')$$,
  $$values ('applied'::text)$$,
  'a credit should pay the debt off'
);
reset role;
select tests.invariants_hold('the invariants should hold after costs, alerts, adjustments and debt');

-- Business metrics ---------------------------------------------------------------------------
set local role service_role;
select ok(
  (select array_agg(distinct metric) from public.business_metrics('0 seconds')) @> array[
    'token_billing_revenue_cents_total', 'token_billing_tokens_used_total',
    'token_billing_tokens_expired_total', 'token_billing_stripe_events_parked',
    'token_billing_invoice_payment_failures_total',
    'token_billing_ledger_totals_through_timestamp_seconds', 'token_billing_alerts'
  ],
  'business_metrics should answer every figure it documents'
);
reset role;

select * from finish();
rollback;
