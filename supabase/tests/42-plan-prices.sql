-- Several prices per plan, mapped back to it; annual prices granting monthly (12 grants) or
-- yearly; scheduled grants once each, and none after a full refund.
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(26);

select tests.create_user('00000000-0000-0000-0000-000000000421', 'annual@example.com');
select public.link_stripe_customer('00000000-0000-0000-0000-000000000421', 'cus_00000000000000');

update billing.products set stripe_price_id = 'price_pro_month'
where code = 'pro';

-- Prices --------------------------------------------------------------------------------------
set local role service_role;
select results_eq(
  $$select status from public.set_product_price('pro', 'year', 'usd', 95000, 'price_pro_year')$$,
  $$values ('applied'::text)$$,
  'a plan''s annual price should be mapped (the seed''s row gets its Stripe price)'
);
select results_eq(
  $$select status from public.set_product_price('pro', 'year', 'usd', 95000, 'price_pro_year')$$,
  $$values ('duplicate'::text)$$,
  'the same price again should answer duplicate'
);
select results_eq(
  $$select status from public.set_product_price('pro', 'month', 'eur', 9500, 'price_pro_month_eur')$$,
  $$values ('applied'::text)$$,
  'a price in another currency should be mapped too'
);
select results_eq(
  $$select status from public.set_product_price('pack_100', 'year', 'usd', 100, 'price_pack_year')$$,
  $$values ('unknown_product'::text)$$,
  'a pack should have no interval prices'
);
select throws_ok(
  $$select * from public.set_product_price('pro', 'week', 'usd', 100, 'price_pro_week')$$,
  '22023', null, 'an unknown interval should raise 22023'
);
select throws_ok(
  $$select * from public.set_product_price('starter', 'year', 'usd', 29000, 'price_pro_year')$$,
  '23505', null, 'a Stripe price mapped to another plan should raise 23505'
);
select results_eq(
  $$select product_code, billing_interval, currency, unit_amount, stripe_price_id
    from public.list_product_prices() order by currency, billing_interval$$,
  $$values ('pro'::text, 'month'::text, 'eur'::text, 9500::bigint, 'price_pro_month_eur'::text),
    ('pro'::text, 'year'::text, 'usd'::text, 95000::bigint, 'price_pro_year'::text)$$,
  'list_product_prices should list the plans'' further prices'
);
reset role;
select is(billing.plan_of_price('price_pro_year'), 'pro', 'the annual price should map back to pro');
select is(billing.plan_of_price('price_pro_month'), 'pro', 'the products row''s price should map to pro');
select is(billing.plan_of_price('price_nobody'), null, 'an unknown price should map to nothing');
select is(billing.price_interval('price_pro_year'), 'year', 'the annual price should be yearly');

-- A subscription on the annual price is a pro subscription -------------------------------------------
set local role service_role;
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json',
    'evt_42_created', 'customer.subscription.created', 1700100000,
    '{"id": "sub_annual421", "metadata": {"user_id": "00000000-0000-0000-0000-000000000421"},
      "items": {"data": [{"price": {"id": "price_pro_year"}, "plan": null}]}}'))$$,
  $$values ('applied'::text)$$,
  'a subscription on the annual price should be applied'
);
reset role;
select results_eq(
  $$select product_code, stripe_price_id from billing.subscriptions where id = 'sub_annual421'$$,
  $$values ('pro'::text, 'price_pro_year'::text)$$,
  'the annual subscription should be recorded as the pro plan'
);

-- An annual invoice, monthly grants (the default) -------------------------------------------------
create function pg_temp.annual_invoice(p_event_id text, p_invoice_id text, p_start bigint) returns jsonb
language sql stable
as $$
  select jsonb_set(
    jsonb_set(
      jsonb_set(
        tests.stripe_event('stripe-ruby-mock-webhook_fixtures/invoice.payment_succeeded.json',
          p_event_id, 'invoice.paid', p_start + 10,
          jsonb_build_object(
            'id', p_invoice_id, 'billing_reason', 'subscription_create', 'subscription', 'sub_annual421',
            'amount_paid', 95000, 'payment_intent', 'pi_' || substr(p_invoice_id, 4),
            'charge', 'ch_' || substr(p_invoice_id, 4))),
        '{data,object,lines,data,0,type}', '"subscription"'),
      '{data,object,lines,data,0,period}',
      jsonb_build_object('start', p_start, 'end', extract(epoch from to_timestamp(p_start) + interval '1 year'))),
    '{data,object,lines,data,0,price,id}', '"price_pro_year"')
$$;

set local role service_role;
select results_eq(
  $$select status, detail from public.handle_stripe_event(
    pg_temp.annual_invoice('evt_42_paid', 'in_annual421', 1767225600))$$,
  $$values ('applied'::text, 'granted 25000 tokens of plan pro (month 1 of 12) to user '
    '00000000-0000-0000-0000-000000000421, expiring 2026-02-01 00:00:00+00 (balance 25100)'::text)$$,
  'a paid annual invoice should grant the first month''s tokens, expiring at that month''s end'
);
reset role;
select results_eq(
  $$select count(*)::int, min(installment), max(installment), min(grant_at), max(expires_at), sum(tokens)::bigint
    from billing.scheduled_grants where stripe_invoice_id = 'in_annual421'$$,
  $$values (11, 2, 12, '2026-02-01 00:00:00+00'::timestamptz, '2027-01-01 00:00:00+00'::timestamptz,
    275000::bigint)$$,
  'months 2 to 12 should be scheduled, one a month, each expiring at its month''s end'
);
select is(
  (
    select tokens from billing.stripe_payments
    where id = 'in_annual421'
  ),
  300000::bigint, 'the payment should be recorded with the whole year''s tokens (refunds claw back from it)'
);
set local role service_role;
select results_eq(
  $$select granted, canceled from public.grant_scheduled_tokens('2026-01-31 23:59:59+00')$$,
  $$values (0::bigint, 0::bigint)$$,
  'nothing should be granted before month 2 begins'
);
select results_eq(
  $$select granted from public.grant_scheduled_tokens('2026-02-01 00:00:00+00')$$,
  $$values (1::bigint)$$,
  'month 2 should be granted when it begins'
);
select results_eq(
  $$select granted from public.grant_scheduled_tokens('2026-02-15 00:00:00+00')$$,
  $$values (0::bigint)$$,
  'running it again should grant nothing twice'
);
reset role;
select results_eq(
  $$select e.amount, e.kind, b.expires_at from billing.ledger_entries as e
    join billing.credit_buckets as b on b.entry_id = e.id
    where e.idempotency_key = 'stripe:invoice:in_annual421:m2'$$,
  $$values (25000::bigint, 'subscription'::text, '2026-03-01 00:00:00+00'::timestamptz)$$,
  'month 2 should be a subscription grant expiring at its month''s end'
);
-- A full refund stops the months still to come.
update billing.stripe_payments set refunded_cents = 95000
where id = 'in_annual421';
set local role service_role;
select results_eq(
  $$select granted, canceled from public.grant_scheduled_tokens('2026-04-01 00:00:00+00')$$,
  $$values (0::bigint, 2::bigint)$$,
  'after a full refund the due months should be canceled, not granted'
);
reset role;
update billing.stripe_payments set refunded_cents = 0
where id = 'in_annual421';
set local role service_role;
select results_eq(
  $$select granted from public.grant_scheduled_tokens('2027-01-01 00:00:00+00')$$,
  $$values (8::bigint)$$,
  'the remaining months should be granted once each'
);
reset role;
select tests.invariants_hold('the books should balance after the monthly grants of an annual plan');

-- annual_grants = yearly: the year at once -------------------------------------------------------
update billing.products set annual_grants = 'yearly'
where code = 'pro';
set local role service_role;
select results_eq(
  $$select status, detail from public.handle_stripe_event(
    pg_temp.annual_invoice('evt_42_paid_2', 'in_annual421b', 1798761600))$$,
  $$values ('applied'::text, 'granted 300000 tokens of plan pro (a year) to user '
    '00000000-0000-0000-0000-000000000421, expiring 2028-01-01 00:00:00+00 (balance 550100)'::text)$$,
  'a yearly plan should grant 12 months of tokens at once, expiring at the year''s end'
);
reset role;
select is(
  (
    select count(*)::int from billing.scheduled_grants
    where stripe_invoice_id = 'in_annual421b'
  ),
  0, 'a yearly grant should schedule nothing'
);
select tests.invariants_hold('the books should balance after an annual grant');

select * from finish();
rollback;
