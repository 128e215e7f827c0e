-- Overage strategies at and across the boundary (block, throttle, postpaid / unlimited,
-- auto_top_up), threshold notifications once per crossing per period, auto top-up requests
-- (one per crossing, at most N per period, off after a failure).
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(56);

select tests.create_user('00000000-0000-0000-0000-000000000411', 'block@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000412', 'throttle@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000413', 'postpaid@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000414', 'topup@example.com');

-- block (free: 100 tokens, thresholds 20% and 0) -----------------------------------------------------
select is(
  (
    select alert_levels from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000411'
  ),
  array[20, 0]::bigint[],
  'a free account should carry the free plan''s alert levels (20% and 0 of 100 tokens)'
);
select results_eq(
  $$select status, balance, retry_after_ms from public.deduct_tokens(
    '00000000-0000-0000-0000-000000000411', 80, 'blk-1')$$,
  $$values ('applied'::text, 20::bigint, null::integer)$$,
  'a deduct to exactly 20% should apply'
);
select results_eq(
  $$select kind, data ->> 'threshold_percent', data ->> 'available' from billing.notifications
    where user_id = '00000000-0000-0000-0000-000000000411'$$,
  $$values ('low_balance'::text, '20'::text, '20'::text)$$,
  'falling to the 20% threshold should raise one low_balance notification'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-000000000411', 19, 'blk-2')$$,
  $$values ('applied'::text, 1::bigint)$$,
  'a deduct below the threshold should apply'
);
select is(
  (
    select count(*)::int from billing.notifications
    where user_id = '00000000-0000-0000-0000-000000000411'
  ),
  1, 'staying below a threshold should not notify again'
);
select results_eq(
  $$select status, balance, entry_id, retry_after_ms from public.deduct_tokens(
    '00000000-0000-0000-0000-000000000411', 2, 'blk-3')$$,
  $$values ('insufficient_funds'::text, 1::bigint, null::bigint, null::integer)$$,
  'block: a deduct across zero should be refused'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-000000000411', 1, 'blk-4')$$,
  $$values ('applied'::text, 0::bigint)$$,
  'block: a deduct to exactly zero should apply'
);
select results_eq(
  $$select kind from billing.notifications where user_id = '00000000-0000-0000-0000-000000000411'
    order by created_at, kind$$,
  $$values ('low_balance'::text), ('out_of_tokens'::text)$$,
  'reaching 0 should raise out_of_tokens once'
);
select status from public.add_tokens('00000000-0000-0000-0000-000000000411', 100, 'blk-refill');
select status from public.deduct_tokens('00000000-0000-0000-0000-000000000411', 95, 'blk-5');
select is(
  (
    select count(*)::int from billing.notifications
    where user_id = '00000000-0000-0000-0000-000000000411'
  ),
  2, 'a second crossing of a threshold in the same period should not notify again'
);
select is(
  (
    select count(*)::int from billing.notification_deliveries as d
    inner join billing.notifications as n on d.notification_id = n.id
    where n.user_id = '00000000-0000-0000-0000-000000000411' and d.status = 'pending'
  ),
  2, 'each notification should have one pending webhook delivery'
);
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-000000000411', 80, 'blk-1')$$,
  $$values ('duplicate'::text)$$,
  'a replayed key should answer duplicate as before'
);

-- throttle (starter: 500 tokens a period below zero, 2 s) --------------------------------------------
update billing.accounts set plan = 'starter', subscription_status = 'active'
where user_id = '00000000-0000-0000-0000-000000000412';
select is(
  (
    select alert_levels from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000412'
  ),
  array[1000, 0]::bigint[],
  'a plan change should set the new plan''s alert levels (20% and 0 of 5,000)'
);
select results_eq(
  $$select status, balance, retry_after_ms from public.deduct_tokens(
    '00000000-0000-0000-0000-000000000412', 100, 'thr-1')$$,
  $$values ('applied'::text, 0::bigint, null::integer)$$,
  'throttle: a deduct the balance covers should apply without a delay'
);
select results_eq(
  $$select status, balance, retry_after_ms from public.deduct_tokens(
    '00000000-0000-0000-0000-000000000412', 300, 'thr-2')$$,
  $$values ('applied'::text, -300::bigint, 2000::integer)$$,
  'throttle: a deduct past zero should apply below zero and answer the plan''s delay'
);
select results_eq(
  $$select metadata ->> 'overage', metadata ->> 'overage_tokens' from billing.ledger_entries
    where idempotency_key = 'thr-2'$$,
  $$values ('throttle'::text, '300'::text)$$,
  'the overage entry should say so in its metadata'
);
select results_eq(
  $$select status, balance, retry_after_ms from public.deduct_tokens(
    '00000000-0000-0000-0000-000000000412', 200, 'thr-3')$$,
  $$values ('applied'::text, -500::bigint, 2000::integer)$$,
  'throttle: a deduct up to exactly the allowance should apply'
);
select results_eq(
  $$select status, balance, retry_after_ms from public.deduct_tokens(
    '00000000-0000-0000-0000-000000000412', 1, 'thr-4')$$,
  $$values ('insufficient_funds'::text, -500::bigint, null::integer)$$,
  'throttle: one token past the allowance should be refused'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-000000000412', 300, 'thr-2')$$,
  $$values ('duplicate'::text, -300::bigint)$$,
  'throttle: a replayed overage key should answer the first result, duplicate'
);
select throws_ok(
  $$select * from public.deduct_tokens('00000000-0000-0000-0000-000000000412', 301, 'thr-2')$$,
  'TBKEY', null, 'throttle: a replayed key with another amount should raise TBKEY'
);
select is(
  (
    select overage_tokens from billing.overage_periods
    where user_id = '00000000-0000-0000-0000-000000000412'
  ),
  500::bigint, 'the period should count 500 tokens of overage'
);
select tests.invariants_hold('the books should balance with throttled overage below zero');
select results_eq(
  $$select status, balance from public.add_tokens('00000000-0000-0000-0000-000000000412', 700, 'thr-credit')$$,
  $$values ('applied'::text, 200::bigint)$$,
  'a credit should pay the overage first'
);
select results_eq(
  $$select status, balance, retry_after_ms from public.deduct_tokens(
    '00000000-0000-0000-0000-000000000412', 250, 'thr-5')$$,
  $$values ('insufficient_funds'::text, 200::bigint, null::integer)$$,
  'across the boundary with the allowance spent: refused, even for the part the balance covers'
);

-- postpaid (enterprise: unlimited, invoiced after the period) ----------------------------------------
update billing.accounts set plan = 'enterprise', subscription_status = 'active'
where user_id = '00000000-0000-0000-0000-000000000413';
select results_eq(
  $$select status, balance, retry_after_ms from public.deduct_tokens(
    '00000000-0000-0000-0000-000000000413', 1100, 'pp-1')$$,
  $$values ('applied'::text, -1000::bigint, null::integer)$$,
  'postpaid: a deduct past zero should apply at once (no delay)'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-000000000413', 1000001, 'pp-2')$$,
  $$values ('applied'::text, -1001001::bigint)$$,
  'postpaid: there should be no limit'
);
select tests.invariants_hold('the books should balance with a postpaid balance below zero');
select is_empty(
  $$select * from public.postpaid_due(now())$$,
  'a period that has not ended should not be due'
);
select results_eq(
  $$select overage_tokens, amount_cents, currency, plan from public.postpaid_due(now() + interval '32 days')$$,
  $$values (1001001::bigint, 200201::bigint, 'usd'::text, 'enterprise'::text)$$,
  'an ended period should be due: 1,001,001 tokens at $2.00 per 1,000, rounded up'
);
update billing.products set postpaid_unit_amount = 3
where code = 'enterprise';
select results_eq(
  $$select amount_cents from public.postpaid_due(now() + interval '32 days')$$,
  $$values (3004::bigint)$$,
  'the amount should be rounded up to a whole cent (1,001,001 x 3 / 1,000 = 3003.003)'
);
select results_eq(
  $$select status, balance from public.mark_postpaid_invoiced(
    '00000000-0000-0000-0000-000000000413', date_trunc('month', now(), 'UTC'), 'ii_pp413')$$,
  $$values ('applied'::text, 0::bigint)$$,
  'marking the period invoiced should credit the invoiced overage back'
);
select results_eq(
  $$select status from public.mark_postpaid_invoiced(
    '00000000-0000-0000-0000-000000000413', date_trunc('month', now(), 'UTC'), 'ii_pp413')$$,
  $$values ('duplicate'::text)$$,
  'marking it again should answer duplicate'
);
select is_empty(
  $$select * from public.postpaid_due(now() + interval '32 days')$$,
  'an invoiced period should not be due again'
);
select throws_ok(
  $$select * from public.mark_postpaid_invoiced('00000000-0000-0000-0000-000000000413', now(), 'in_x')$$,
  '22023', null, 'an invoice item id that is not ii_ should raise 22023'
);
select tests.invariants_hold('the books should balance after the postpaid credit');

-- auto_top_up (pro: pack_600 when 20% of 25,000 = 5,000 is left, at most 3 a period) -----------------
update billing.accounts set plan = 'pro', subscription_status = 'active'
where user_id = '00000000-0000-0000-0000-000000000414';
select status from public.add_tokens('00000000-0000-0000-0000-000000000414', 5500, 'tu-grant');
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-000000000414', 500, 'tu-1')$$,
  $$values ('applied'::text, 5100::bigint)$$,
  'auto_top_up: a deduct above the threshold should apply'
);
select is(
  (
    select count(*)::int from billing.auto_top_ups
    where user_id = '00000000-0000-0000-0000-000000000414'
  ),
  0, 'no top-up should be requested above the threshold'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-000000000414', 100, 'tu-2')$$,
  $$values ('applied'::text, 5000::bigint)$$,
  'a deduct to exactly the threshold should apply'
);
select results_eq(
  $$select n, product_code, amount_cents, currency, status, available_at_crossing from billing.auto_top_ups
    where user_id = '00000000-0000-0000-0000-000000000414'$$,
  $$values (1, 'pack_600'::text, 2000::bigint, 'usd'::text, 'pending'::text, 5000::bigint)$$,
  'reaching the threshold should request one top-up of the plan''s pack'
);
select status from public.deduct_tokens('00000000-0000-0000-0000-000000000414', 100, 'tu-3');
select is(
  (
    select count(*)::int from billing.auto_top_ups
    where user_id = '00000000-0000-0000-0000-000000000414'
  ),
  1, 'further deducts below the threshold should request nothing more'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-000000000414', 6000, 'tu-4')$$,
  $$values ('insufficient_funds'::text, 4900::bigint)$$,
  'auto_top_up: a deduct past zero should be refused (the top-up is bought, not owed)'
);

set local role service_role;
select results_eq(
  $$select product_code, amount_cents, idempotency_key = 'tb-auto-top-up-' || id::text, attempts
    from public.claim_auto_top_ups(10, '2 minutes')$$,
  $$values ('pack_600'::text, 2000::bigint, true, 1)$$,
  'the worker should claim the top-up with its crossing''s idempotency key'
);
select is_empty(
  $$select * from public.claim_auto_top_ups(10, '2 minutes')$$,
  'a claimed top-up should not be claimed again within its lease'
);
select results_eq(
  $$select attempts from public.claim_auto_top_ups(10, '2 minutes', now() + interval '3 minutes')$$,
  $$values (2)$$,
  'after the lease another worker should claim it, with the same key'
);
select results_eq(
  $$select status from public.finish_auto_top_up(
    (select id from billing.auto_top_ups where user_id = '00000000-0000-0000-0000-000000000414'),
    'failed', null, 'card_declined')$$,
  $$values ('applied'::text)$$,
  'a declined top-up should be reported'
);
select results_eq(
  $$select status from public.finish_auto_top_up(
    (select id from billing.auto_top_ups where user_id = '00000000-0000-0000-0000-000000000414'),
    'succeeded', '{"id": "pi_x"}', null)$$,
  $$values ('duplicate'::text)$$,
  'a second report of the same top-up should answer duplicate'
);
reset role;
select results_eq(
  $$select enabled from billing.auto_top_up_preferences where user_id = '00000000-0000-0000-0000-000000000414'$$,
  $$values (false)$$,
  'a declined top-up should turn auto top-up off for the user'
);
select results_eq(
  $$select kind, data ->> 'reason' from billing.notifications
    where user_id = '00000000-0000-0000-0000-000000000414' and kind like 'auto_top_up%'$$,
  $$values ('auto_top_up_failed'::text, 'card_declined'::text)$$,
  'the user should be notified of the failed top-up'
);
select status from public.add_tokens('00000000-0000-0000-0000-000000000414', 1000, 'tu-refill-1');
select status from public.deduct_tokens('00000000-0000-0000-0000-000000000414', 1000, 'tu-5');
select is(
  (
    select count(*)::int from billing.auto_top_ups
    where user_id = '00000000-0000-0000-0000-000000000414'
  ),
  1, 'with auto top-up off a crossing should buy nothing'
);
set local role service_role;
select results_eq(
  $$select status from public.set_auto_top_up('00000000-0000-0000-0000-000000000414', true, 'card updated')$$,
  $$values ('applied'::text)$$,
  'auto top-up should be turned on again'
);
reset role;
select status from public.add_tokens('00000000-0000-0000-0000-000000000414', 1000, 'tu-refill-2');
select status from public.deduct_tokens('00000000-0000-0000-0000-000000000414', 1000, 'tu-6');
select results_eq(
  $$select n, status from billing.auto_top_ups where user_id = '00000000-0000-0000-0000-000000000414'
    order by n$$,
  $$values (1, 'failed'::text), (2, 'pending'::text)$$,
  'with auto top-up on again the next crossing should request the period''s second top-up'
);
-- At most N a period: the plan allows 2 now; the second one charged, a third crossing buys nothing.
update billing.products set auto_top_up_max_per_period = 2
where code = 'pro';
update billing.auto_top_ups set status = 'charged', decided_at = now()
where user_id = '00000000-0000-0000-0000-000000000414' and n = 2;
select status from public.add_tokens('00000000-0000-0000-0000-000000000414', 1000, 'tu-refill-3');
select status from public.deduct_tokens('00000000-0000-0000-0000-000000000414', 1000, 'tu-7');
select is(
  (
    select count(*)::int from billing.auto_top_ups
    where user_id = '00000000-0000-0000-0000-000000000414'
  ),
  2, 'a crossing past the period''s maximum of top-ups should buy nothing'
);
select is(
  (
    select top_ups from billing.overage_periods
    where user_id = '00000000-0000-0000-0000-000000000414'
  ),
  2, 'the period should count its two top-ups'
);
-- A refused deduct that would cross the threshold counts as the crossing.
update billing.products set auto_top_up_max_per_period = 3
where code = 'pro';
select status from public.add_tokens('00000000-0000-0000-0000-000000000414', 1000, 'tu-refill-4');
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-000000000414', 100000, 'tu-8')$$,
  $$values ('insufficient_funds'::text)$$,
  'a deduct far past the balance should be refused'
);
select results_eq(
  $$select n, status from billing.auto_top_ups where user_id = '00000000-0000-0000-0000-000000000414'
    and n = 3$$,
  $$values (3, 'pending'::text)$$,
  'the refused deduct should still request a top-up for its crossing'
);
select throws_ok(
  $$select * from public.finish_auto_top_up(gen_random_uuid(), 'maybe')$$,
  '22023', null, 'an unknown outcome should raise 22023'
);
select tests.invariants_hold('the books should balance after all the strategies');

select * from finish();
rollback;
