-- Rate cards and usage records: every pricing scheme with its exact tokens (Aegis' graduated
-- 5,000 calls and the monetization guide's gpt-4o prices among them), tiers across calls of a
-- period, rounding once per period, price versions, customer terms, idempotency, holds.
begin;
set local search_path = extensions, public;
select plan(67);

select tests.create_user('00000000-0000-0000-0000-0000000000a1', 'a1@example.com');
select tests.create_user('00000000-0000-0000-0000-0000000000b1', 'b1@example.com');
select tests.create_user('00000000-0000-0000-0000-0000000000c1', 'c1@example.com');
select status from public.add_tokens('00000000-0000-0000-0000-0000000000a1', 1000000, 'rc-fund-a');

-- Test meters of our own, beside the seed's catalog.
insert into billing.meters (code, unit, dimension) values
('t.package_up', 'unit', null),
('t.package_down', 'unit', null),
('t.volume', 'unit', null),
('t.flat', 'unit', null),
('t.minimum', 'unit', null),
('t.versioned', 'unit', null),
('t.unpriced', 'unit', null);
insert into billing.prices (meter_code, scheme, unit_amount, package_size, rounding, effective_from) values
('t.package_up', 'package', 3, 1000, 'up', '2026-01-01'),
('t.package_down', 'package', 3, 1000, 'down', '2026-01-01');
insert into billing.prices (meter_code, scheme, tiers, effective_from) values
('t.volume', 'volume', '[{"up_to": 100, "unit_amount": 5}, {"up_to": null, "unit_amount": 3}]', '2026-01-01'),
(
  't.flat', 'graduated',
  '[{"up_to": 10, "unit_amount": 0, "flat_amount": 50}, {"up_to": null, "unit_amount": 2}]', '2026-01-01'
);
insert into billing.prices (meter_code, scheme, unit_amount, minimum_tokens, effective_from) values
('t.minimum', 'per_unit', 1, 3, '2026-01-01'),
('t.versioned', 'per_unit', 2, 0, '2026-01-01');

-- Shape ------------------------------------------------------------------------------------------
select has_table('billing', 'meters', 'billing.meters should exist');
select has_table('billing', 'prices', 'billing.prices should exist');
select has_table('billing', 'customer_terms', 'billing.customer_terms should exist');
select has_table('billing', 'usage_records', 'billing.usage_records should exist');
select ok(
  (
    select bool_and(c.relrowsecurity) from pg_class as c
    where c.oid in (
        'billing.meters'::regclass, 'billing.prices'::regclass,
        'billing.customer_terms'::regclass, 'billing.usage_records'::regclass
      )
  ),
  'every rate card table should have row level security enabled'
);
select throws_ok(
  $$insert into billing.prices (meter_code, scheme, tiers) values
    ('t.volume', 'graduated', '[{"up_to": 10, "unit_amount": 1}, {"up_to": 5, "unit_amount": 1}]')$$,
  '23514', null, 'tiers whose up_to does not increase should be refused'
);
select throws_ok(
  $$insert into billing.prices (meter_code, scheme, unit_amount, rounding) values ('t.volume', 'per_unit', 1,
    'nearest')$$,
  '23514', null, 'a rounding other than up or down should be refused'
);

-- Every scheme, exact tokens (quotes: nothing is charged) ---------------------------------------
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "agent.run", "quantity": 3}]'
      )
  ),
  15::bigint, 'per_unit: 3 agent runs at 5 should cost 15 tokens'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "llm.input_tokens", "quantity": 1200, "dimensions": {"model": "gpt-4o"}},
      {"meter": "llm.output_tokens", "quantity": 800, "dimensions": {"model": "gpt-4o"}}]'
      )
  ),
  11::bigint,
  'the guide''s gpt-4o: 1,200 input at 2.5/1K (3, rounded up) + 800 output at 10/1K (8) should be 11'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "llm.input_tokens", "quantity": 1000000, "dimensions": {"model": "gpt-4o"}},
      {"meter": "llm.output_tokens", "quantity": 1000000, "dimensions": {"model": "gpt-4o"}}]'
      )
  ),
  12500::bigint, 'the guide''s gpt-4o: 1M input (2,500) + 1M output (10,000) should be 12,500 tokens'
);
select is(
  (
    select (
      items -> 0 ->> 'price_id')::bigint from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "llm.input_tokens", "quantity": 10, "dimensions": {"model": "some-new-model"}}]'
      )
  ),
  (
    select id from billing.prices
    where meter_code = 'llm.input_tokens' and dimension_value = '*'
  ),
  'a model without a price of its own should be priced at the meter''s default'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "llm.output_tokens", "quantity": 10000, "dimensions": {"model": "gpt-4o-mini"}}]'
      )
  ),
  6::bigint, 'a model with its own price should be priced at it (gpt-4o-mini output 0.6/1K: 6)'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.package_up", "quantity": 2500}]'
      )
  ),
  9::bigint, 'package rounded up: 2,500 units in packages of 1,000 at 3 should be 3 packages, 9 tokens'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.package_down", "quantity": 2500}]'
      )
  ),
  6::bigint, 'package rounded down: 2,500 units should be 2 packages, 6 tokens'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "api.call", "quantity": 5000}]'
      )
  ),
  42000::bigint, 'Aegis'' graduated example: 5,000 calls = 1,000 x 10 + 4,000 x 8 = 42,000 tokens'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "api.call", "quantity": 1000}]'
      )
  ),
  10000::bigint, 'graduated: exactly the first tier''s bound should all be at the first tier''s rate'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.volume", "quantity": 100}]'
      )
  ),
  500::bigint, 'volume: 100 units (the first tier''s bound) should all be at 5'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.volume", "quantity": 200}]'
      )
  ),
  600::bigint, 'volume: 200 units should all be at the second tier''s 3'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.flat", "quantity": 5}, {"meter": "t.volume", "quantity": 0}]'
      )
  ),
  50::bigint, 'a tier''s flat amount should be charged once the tier is reached (5 units: 50)'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.flat", "quantity": 15}]'
      )
  ),
  60::bigint, 'graduated with a flat first tier: 15 units = 50 + 5 x 2'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.minimum", "quantity": 1}]'
      )
  ),
  3::bigint, 'a minimum charge should apply to an item that costs less'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.minimum", "quantity": 0}]'
      )
  ),
  0::bigint, 'a minimum charge should not apply to a quantity of zero'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "api.call", "quantity": 600}, {"meter": "api.call", "quantity": 600}]'
      )
  ),
  11600::bigint, 'two items of one graduated meter in one call should accumulate (6,000 + 5,600)'
);

-- Bad items --------------------------------------------------------------------------------------
select throws_ok(
  $$select * from public.quote_usage('00000000-0000-0000-0000-0000000000a1', '[]')$$,
  '22023', null, 'an empty item list should be refused'
);
select throws_ok(
  $$select * from public.quote_usage('00000000-0000-0000-0000-0000000000a1', '[{"meter": "agent.run",
    "quantity": 1.5}]')$$,
  '22023', 'p_items[0] must be {"meter": text, "quantity": an integer 0..10^12, "dimensions": {...}}',
  'a fractional quantity should be refused, naming the item'
);
select throws_ok(
  $$select * from public.quote_usage('00000000-0000-0000-0000-0000000000a1', '[{"meter": "nope", "quantity": 1}]')$$,
  '22023', 'p_items[0].meter: unknown meter ''nope''', 'an unknown meter should be refused, naming it'
);
select throws_ok(
  $$select * from public.quote_usage('00000000-0000-0000-0000-0000000000a1', '[{"meter": "t.unpriced",
    "quantity": 1}]')$$,
  'TBPRC', null, 'a meter without a price should be refused with TBPRC'
);

-- Graduated tiers across calls of one period (record_usage charges) -----------------------------
select results_eq(
  $$select status, tokens from public.record_usage('00000000-0000-0000-0000-0000000000a1',
    '[{"meter": "api.call", "quantity": 600}]', 'rc-calls-1')$$,
  $$values ('applied'::text, 6000::bigint)$$, 'the first 600 calls of the period should cost 6,000'
);
select results_eq(
  $$select status, tokens from public.record_usage('00000000-0000-0000-0000-0000000000a1',
    '[{"meter": "api.call", "quantity": 600}]', 'rc-calls-2')$$,
  $$values ('applied'::text, 5600::bigint)$$,
  'the next 600 should cross the tier bound: 400 x 10 + 200 x 8 = 5,600'
);
select results_eq(
  $$select status, tokens from public.record_usage('00000000-0000-0000-0000-0000000000a1',
    '[{"meter": "api.call", "quantity": 3800}]', 'rc-calls-3')$$,
  $$values ('applied'::text, 30400::bigint)$$, 'the last 3,800 should all be at 8'
);
select is(
  (
    select sum(tokens)::bigint from billing.usage_records
    where user_id = '00000000-0000-0000-0000-0000000000a1' and meter_code = 'api.call'
  ),
  42000::bigint, 'the period''s three calls should add up to Aegis'' 42,000 exactly'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "api.call", "quantity": 10}]', '2026-01-15'
      )
  ),
  100::bigint, 'another period should start again at the first tier'
);

-- Rounding once per period: five calls of 100 input tokens at 2.5/1K cost F(500) = 2, not 5.
select is(
  (
    select array_agg(r.tokens order by n)
    from generate_series(1, 5) as n
    cross join lateral public.record_usage(
      '00000000-0000-0000-0000-0000000000a1',
      '[{"meter": "llm.input_tokens", "quantity": 100, "dimensions": {"model": "gpt-4o"}}]',
      'rc-small-' || n
    ) as r
  ),
  array[1, 0, 0, 0, 1]::bigint[],
  'small calls should pay only when the period''s rounded total grows (1, 0, 0, 0, 1)'
);

-- Price versions ---------------------------------------------------------------------------------
select results_eq(
  $$select tokens from public.record_usage('00000000-0000-0000-0000-0000000000a1',
    '[{"meter": "t.versioned", "quantity": 10}]', 'rc-v1')$$,
  $$values (20::bigint)$$, 'version 1 should price 10 units at 2'
);
insert into billing.prices (meter_code, scheme, unit_amount, effective_from) values (
  't.versioned', 'per_unit', 3, now()
);
select results_eq(
  $$select tokens from public.record_usage('00000000-0000-0000-0000-0000000000a1',
    '[{"meter": "t.versioned", "quantity": 10}]', 'rc-v2')$$,
  $$values (30::bigint)$$, 'a new version in effect should price 10 units at 3'
);
select results_eq(
  $$select r.tokens, p.unit_amount from billing.usage_records as r
    join billing.prices as p on p.id = r.price_id
    where r.idempotency_key in ('rc-v1', 'rc-v2') order by r.id$$,
  $$values (20::bigint, 2::bigint), (30::bigint, 3::bigint)$$,
  'each usage record should keep the price version it was charged at'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.versioned", "quantity": 10}]', '2026-06-01'
      )
  ),
  20::bigint, 'a quote at an earlier time should use the version in effect then'
);
select throws_ok(
  $$update billing.prices set unit_amount = 1 where meter_code = 't.versioned'$$,
  'TBAPP', null, 'a price version should never be edited (history is never rewritten)'
);

-- Customer terms ---------------------------------------------------------------------------------
insert into billing.customer_terms (user_id, meter_code, percent_off, valid_from, valid_until) values
('00000000-0000-0000-0000-0000000000a1', null, 15, '2026-01-01', null),
('00000000-0000-0000-0000-0000000000a1', 't.versioned', 50, '2026-01-01', null),
('00000000-0000-0000-0000-0000000000a1', 'report.generated', 90, '2026-01-01', '2026-02-01');
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "agent.run", "quantity": 3}]'
      )
  ),
  13::bigint, 'a 15% discount on 15 tokens should take floor(2.25) = 2 off: 13'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "t.versioned", "quantity": 11}]'
      )
  ),
  17::bigint, 'a meter''s own term should win over the all-meter one: 33 - floor(16.5) = 17'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "report.generated", "quantity": 1}]'
      )
  ),
  17::bigint, 'an expired term should not apply (the all-meter 15% does: 20 - 3)'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000b1',
        '[{"meter": "agent.run", "quantity": 3}]'
      )
  ),
  15::bigint, 'another user should pay the list price'
);
insert into billing.prices (meter_code, custom, scheme, unit_amount, effective_from)
values ('agent.run', true, 'per_unit', 1, '2026-01-01');
insert into billing.customer_terms (user_id, meter_code, override_price_id, valid_from)
select
  '00000000-0000-0000-0000-0000000000a1' as user_id,
  'agent.run' as meter_code,
  max(id) as override_price_id,
  '2026-01-02' as valid_from
from billing.prices
where custom;
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000a1',
        '[{"meter": "agent.run", "quantity": 3}]'
      )
  ),
  3::bigint, 'an override price should replace the list price for the user'
);
select is(
  (
    select tokens
    from public.quote_usage(
        '00000000-0000-0000-0000-0000000000b1',
        '[{"meter": "agent.run", "quantity": 3}]'
      )
  ),
  15::bigint, 'a custom price should never be anyone else''s list price'
);

-- Idempotency ------------------------------------------------------------------------------------
select results_eq(
  $$select status, tokens from public.record_usage('00000000-0000-0000-0000-0000000000b1',
    '[{"meter": "agent.run", "quantity": 2}]', 'rc-idem')$$,
  $$values ('applied'::text, 10::bigint)$$, 'a first call should apply'
);
select results_eq(
  $$select status, balance, entry_id, tokens from public.record_usage('00000000-0000-0000-0000-0000000000b1',
    '[{"meter": "agent.run", "quantity": 2}]', 'rc-idem')$$,
  $$select 'duplicate'::text, 90::bigint, id,
    10::bigint from billing.ledger_entries where idempotency_key = 'rc-idem'$$,
  'the same key and items should answer the first result as duplicate'
);
select is(tests.balance('00000000-0000-0000-0000-0000000000b1'), 90::bigint, 'a duplicate should charge nothing');
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000000b1',
    '[{"meter": "agent.run", "quantity": 3}]', 'rc-idem')$$,
  'TBKEY', null, 'the same key with other items should raise TBKEY'
);
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000000c1',
    '[{"meter": "agent.run", "quantity": 2}]', 'rc-idem')$$,
  'TBKEY', null, 'the same key for another user should raise TBKEY'
);
select status from public.deduct_tokens('00000000-0000-0000-0000-0000000000b1', 10, 'rc-plain-deduct');
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000000b1',
    '[{"meter": "agent.run", "quantity": 2}]', 'rc-plain-deduct')$$,
  'TBKEY', null, 'a key a plain deduct used should raise TBKEY'
);

-- Statuses of a deduct -------------------------------------------------------------------------
select results_eq(
  $$select status, balance from public.record_usage('00000000-0000-0000-0000-0000000000b1',
    '[{"meter": "agent.run", "quantity": 100}]', 'rc-broke')$$,
  $$values ('insufficient_funds'::text, 80::bigint)$$,
  'usage beyond the available tokens should be insufficient_funds'
);
select is_empty(
  $$select 1 from billing.usage_records where idempotency_key = 'rc-broke'$$,
  'refused usage should leave no record'
);
select results_eq(
  $$select status from public.record_usage('00000000-0000-0000-0000-00000000ffff',
    '[{"meter": "agent.run", "quantity": 1}]', 'rc-nobody')$$,
  $$values ('unknown_account'::text)$$, 'usage of a user without an account should be unknown_account'
);
select results_eq(
  $$select status, entry_id, tokens from public.record_usage('00000000-0000-0000-0000-0000000000b1',
    '[{"meter": "agent.run", "quantity": 0}]', 'rc-zero')$$,
  $$values ('applied'::text, null::bigint, 0::bigint)$$,
  'usage that costs nothing should be recorded without a ledger entry'
);

-- Holds ------------------------------------------------------------------------------------------
select status from public.reserve_tokens('00000000-0000-0000-0000-0000000000c1', 50, 'rc-hold-c');
select results_eq(
  $$select status, balance, tokens from public.record_usage('00000000-0000-0000-0000-0000000000c1',
    '[{"meter": "agent.run", "quantity": 4}]', 'rc-settle-c',
      (select id from billing.reservations where idempotency_key = 'rc-hold-c'))$$,
  $$values ('applied'::text, 80::bigint, 20::bigint)$$,
  'usage settling a hold should charge the priced tokens and release the rest'
);
select results_eq(
  $$select status, reserved from billing.reservations as r
    join billing.accounts as a using (user_id) where r.id =
      (select id from billing.reservations where idempotency_key = 'rc-hold-c')$$,
  $$values ('settled'::text, 0::bigint)$$, 'the hold should be settled and nothing left reserved'
);
select results_eq(
  $$select status from public.record_usage('00000000-0000-0000-0000-0000000000c1',
    '[{"meter": "agent.run", "quantity": 4}]', 'rc-settle-c',
      (select id from billing.reservations where idempotency_key = 'rc-hold-c'))$$,
  $$values ('duplicate'::text)$$, 'retrying the settlement should be a duplicate'
);
select results_eq(
  $$select status from public.record_usage('00000000-0000-0000-0000-0000000000c1',
    '[{"meter": "agent.run", "quantity": 4}]', 'rc-settle-c-again',
      (select id from billing.reservations where idempotency_key = 'rc-hold-c'))$$,
  $$values ('not_pending'::text)$$, 'usage on a resolved hold under a new key should be not_pending'
);
select status from public.reserve_tokens('00000000-0000-0000-0000-0000000000c1', 50, 'rc-hold-c2');
select results_eq(
  $$select status, balance, tokens from public.record_usage('00000000-0000-0000-0000-0000000000c1',
    '[{"meter": "agent.run", "quantity": 30}]', 'rc-overrun-c',
      (select id from billing.reservations where idempotency_key = 'rc-hold-c2'))$$,
  $$values ('partial'::text, 0::bigint, 150::bigint)$$,
  'an overrun beyond available should be capped at zero: partial (80 of 150 charged)'
);
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000000b1',
    '[{"meter": "agent.run", "quantity": 1}]', 'rc-foreign',
      (select id from billing.reservations where idempotency_key = 'rc-hold-c2'))$$,
  '22023', null, 'a hold of another user should be refused'
);
select status from public.reserve_tokens('00000000-0000-0000-0000-0000000000b1', 5, 'rc-hold-b');
select results_eq(
  $$select status, entry_id, tokens from public.record_usage('00000000-0000-0000-0000-0000000000b1',
    '[{"meter": "agent.run", "quantity": 0}]', 'rc-free-b',
      (select id from billing.reservations where idempotency_key = 'rc-hold-b'))$$,
  $$values ('applied'::text, null::bigint, 0::bigint)$$, 'usage costing nothing should release the hold'
);

-- Summaries --------------------------------------------------------------------------------------
select results_eq(
  $$select meter, quantity, tokens, records from public.usage_summary('00000000-0000-0000-0000-0000000000a1',
    now() - interval '1 day', now() + interval '1 day') where meter = 'api.call'$$,
  $$values ('api.call'::text, 5000::bigint, 42000::bigint, 3::bigint)$$,
  'usage_summary should add up a meter''s records of the period'
);
select results_eq(
  $$select dimension, quantity from public.usage_summary('00000000-0000-0000-0000-0000000000a1',
    now() - interval '1 day', now() + interval '1 day', 'model') where meter = 'llm.input_tokens'$$,
  $$values ('gpt-4o'::text, 500::bigint)$$, 'usage_summary should group by a dimension when asked'
);
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-0000000000b1", "role": "authenticated"}',
  true
);
set local role authenticated;
select results_eq(
  $$select meter, quantity, tokens from public.my_usage(now() - interval '1 day', now() + interval '1 day')$$,
  $$values ('agent.run'::text, 2::bigint, 10::bigint)$$,
  'my_usage should show the signed-in user only the own usage'
);
reset role;
select throws_ok(
  $$delete from billing.usage_records$$, 'TBAPP', null, 'usage records should be append-only'
);

select is_empty(
  $$select t.user_id, t.meter_code, t.quantity, sum(r.quantity)
    from billing.usage_totals as t
    left join billing.usage_records as r
      on r.user_id = t.user_id and r.meter_code = t.meter_code and r.dimension_value = t.dimension_value
    group by t.user_id, t.meter_code, t.quantity
    having t.quantity is distinct from sum(r.quantity)::bigint$$,
  'each running total should equal the sum of its usage records'
);
select tests.invariants_hold('the books should balance after all this usage');

select * from finish();
rollback;
