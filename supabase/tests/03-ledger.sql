-- add_tokens and deduct_tokens: every status, idempotency, invalid input, bucket order, debt.
begin;
set local search_path = extensions, public;
select plan(52);

select tests.create_user('00000000-0000-0000-0000-00000000000c', 'c@example.com');
select tests.create_user('00000000-0000-0000-0000-00000000000d', 'd@example.com');

set local role service_role;

-- add_tokens ------------------------------------------------------------------------------------
select results_eq(
  $$select status, balance from public.add_tokens(
    '00000000-0000-0000-0000-00000000000c', 50, 'add-1', 'purchase', 'Pack', null, '{"order": 1}')$$,
  $$values ('applied'::text, 150::bigint)$$,
  'add_tokens should credit on top of the signup grant and answer applied'
);
select results_eq(
  $$select status, balance, entry_id from public.add_tokens(
    '00000000-0000-0000-0000-00000000000c', 50, 'add-1', 'purchase')$$,
  $$select 'duplicate'::text, 150::bigint, id from billing.ledger_entries where idempotency_key = 'add-1'$$,
  'the same key and arguments should return the first result as duplicate'
);
select is(
  (
    select count(*)::int from billing.ledger_entries
    where idempotency_key = 'add-1'
  ), 1,
  'a duplicate should write nothing'
);
select is(
  tests.balance('00000000-0000-0000-0000-00000000000c'),
  150::bigint, 'a duplicate should not change the balance'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 51, 'add-1', 'purchase')$$,
  'TBKEY', null, 'the same key with another amount should raise TBKEY'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000d', 50, 'add-1', 'purchase')$$,
  'TBKEY', null, 'the same key for another user should raise TBKEY'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 50, 'add-1', 'promotion')$$,
  'TBKEY', null, 'the same key with another kind should raise TBKEY'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 50, 'add-1', 'purchase',
    null, now() + interval '1 day')$$,
  'TBKEY', null, 'the same key with another expiry should raise TBKEY'
);
select throws_ok(
  $$select * from public.deduct_tokens('00000000-0000-0000-0000-00000000000c', 50, 'add-1')$$,
  'TBKEY', null, 'a credit''s key reused for a deduction should raise TBKEY'
);
select results_eq(
  $$select status, balance, entry_id from public.add_tokens(
    '00000000-0000-0000-0000-0000000000ff', 50, 'add-ghost')$$,
  $$values ('unknown_account'::text, null::bigint, null::bigint)$$,
  'add_tokens for a user without an account should answer unknown_account'
);
select results_eq(
  $$select kind, amount, balance_after, description, metadata from billing.ledger_entries
    where idempotency_key = 'add-1'$$,
  $$values ('purchase'::text, 50::bigint, 150::bigint, 'Pack'::text, '{"order": 1}'::jsonb)$$,
  'the entry should carry kind, signed amount, balance after, description and metadata'
);

-- Invalid arguments: a clear 22023 naming the argument, nothing written.
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', null, 'bad-1')$$,
  '22023', 'p_amount must be a positive integer of at most 10^15, got null',
  'a null amount should raise 22023 naming p_amount'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 0, 'bad-2')$$,
  '22023', null, 'a zero amount should raise 22023'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', -5, 'bad-3')$$,
  '22023', null, 'a negative amount should raise 22023'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 1000000000000001, 'bad-4')$$,
  '22023', null, 'an amount above 10^15 should raise 22023'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c',
    9223372036854775808::bigint, 'bad-5')$$,
  '22003', null, 'an amount beyond bigint should be refused as out of range'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 5, null)$$,
  '22023', 'p_idempotency_key must be a non-empty text of at most 255 characters',
  'a null key should raise 22023 naming p_idempotency_key'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 5, '   ')$$,
  '22023', null, 'a blank key should raise 22023'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 5, repeat('k', 256))$$,
  '22023', null, 'a key over 255 characters should raise 22023'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 5, 'bad-6', 'gift')$$,
  '22023', null, 'an unknown kind should raise 22023'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 5, 'bad-7', null)$$,
  '22023', null, 'a null kind should raise 22023'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 5, 'bad-8', 'usage')$$,
  '22023', null, 'a debit kind should not be accepted by add_tokens'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 5, 'bad-9', 'promotion',
    null, now() - interval '1 second')$$,
  '22023', null, 'an expiry in the past should raise 22023'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000c', 5, 'bad-10', 'promotion',
    null, null, '[1, 2]')$$,
  '22023', null, 'metadata that is not an object should raise 22023'
);
select throws_ok(
  $$select * from public.deduct_tokens('00000000-0000-0000-0000-00000000000c', 0, 'bad-11')$$,
  '22023', null, 'deduct_tokens with a zero amount should raise 22023'
);
select throws_ok(
  $$select * from public.deduct_tokens('00000000-0000-0000-0000-00000000000c', 5, '')$$,
  '22023', null, 'deduct_tokens with an empty key should raise 22023'
);
select is(
  (
    select count(*)::int from billing.ledger_entries
    where idempotency_key like 'bad-%'
  ), 0,
  'no invalid call should have written an entry'
);
select is(
  tests.balance('00000000-0000-0000-0000-00000000000c'),
  150::bigint, 'no invalid call should have changed the balance'
);

-- deduct_tokens ---------------------------------------------------------------------------------
select results_eq(
  $$select status, balance from public.deduct_tokens(
    '00000000-0000-0000-0000-00000000000c', 20, 'use-1', 'chat', '{"request": "r1"}')$$,
  $$values ('applied'::text, 130::bigint)$$,
  'deduct_tokens should charge usage and answer applied with the new balance'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-00000000000c', 20, 'use-1')$$,
  $$values ('duplicate'::text, 130::bigint)$$,
  'a retried deduction should be a duplicate with the first balance'
);
select results_eq(
  $$select status, balance, entry_id from public.deduct_tokens(
    '00000000-0000-0000-0000-00000000000c', 131, 'use-2')$$,
  $$values ('insufficient_funds'::text, 130::bigint, null::bigint)$$,
  'a deduction above the available balance should answer insufficient_funds'
);
select is(
  (
    select count(*)::int from billing.ledger_entries
    where idempotency_key = 'use-2'
  ), 0,
  'insufficient_funds should write nothing'
);
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-0000000000ff', 1, 'use-3')$$,
  $$values ('unknown_account'::text)$$,
  'a deduction for a user without an account should answer unknown_account'
);
select results_eq(
  $$select status, balance from public.deduct_tokens(
    '00000000-0000-0000-0000-00000000000c', 130, 'use-4')$$,
  $$values ('applied'::text, 0::bigint)$$,
  'deducting exactly the available balance should succeed and leave zero'
);
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-00000000000c', 1, 'use-5')$$,
  $$values ('insufficient_funds'::text)$$,
  'an empty account should refuse usage'
);
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-00000000000c', 20, 'use-1')$$,
  $$values ('duplicate'::text, 130::bigint)$$,
  'a retry of an applied deduction should stay a duplicate even when funds ran out since'
);
reset role;

-- Bucket order: soonest expiry first, then never-expiring oldest first ------------------------------
-- User d: signup bucket (100, never), then 50 expiring in 10 days, 30 in 2 days, 40 never.
set local role service_role;
select * from public.add_tokens(
    '00000000-0000-0000-0000-00000000000d', 50, 'b-10d', 'promotion',
    null, now() + interval '10 days'
  );
select * from public.add_tokens(
    '00000000-0000-0000-0000-00000000000d', 30, 'b-2d', 'promotion',
    null, now() + interval '2 days'
  );
select * from public.add_tokens('00000000-0000-0000-0000-00000000000d', 40, 'b-never', 'purchase');
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-00000000000d', 45, 'b-use-1')$$,
  $$values ('applied'::text, 175::bigint)$$,
  'a deduction across buckets should be one entry'
);
reset role;

select results_eq(
  $$select undrawn from billing.accounts where user_id = '00000000-0000-0000-0000-00000000000d'$$,
  $$values (45::bigint)$$,
  'usage should touch no bucket: it waits in undrawn until buckets change'
);
select lives_ok(
  $$select billing.draw_buckets('00000000-0000-0000-0000-00000000000d')$$,
  'drawing the undrawn debits should succeed'
);

select results_eq(
  $$select e.idempotency_key, b.remaining
    from billing.credit_buckets as b join billing.ledger_entries as e on e.id = b.entry_id
    where b.user_id = '00000000-0000-0000-0000-00000000000d' order by b.id$$,
  $$values ('signup:00000000-0000-0000-0000-00000000000d'::text, 100::bigint),
    ('b-10d', 35), ('b-2d', 0), ('b-never', 40)$$,
  'the soonest-expiring bucket should be emptied first, then the next to expire'
);

set local role service_role;
select * from public.deduct_tokens('00000000-0000-0000-0000-00000000000d', 135, 'b-use-2');
reset role;
select billing.draw_buckets('00000000-0000-0000-0000-00000000000d');
select results_eq(
  $$select e.idempotency_key, b.remaining
    from billing.credit_buckets as b join billing.ledger_entries as e on e.id = b.entry_id
    where b.user_id = '00000000-0000-0000-0000-00000000000d' order by b.id$$,
  $$values ('signup:00000000-0000-0000-0000-00000000000d'::text, 0::bigint),
    ('b-10d', 0), ('b-2d', 0), ('b-never', 40)$$,
  'never-expiring buckets should be consumed oldest first'
);

-- Debt: a clawback may take the balance below zero; usage is refused; a credit pays it off first.
select results_eq(
  $$select status, balance from billing.debit('00000000-0000-0000-0000-00000000000d', 100,
    'clawback-1', 'clawback', null, '{}', true)$$,
  $$values ('applied'::text, -60::bigint)$$,
  'a clawback with debt allowed should take the balance below zero'
);
select billing.draw_buckets('00000000-0000-0000-0000-00000000000d');
select is(
  (
    select sum(remaining)::bigint from billing.credit_buckets
    where user_id = '00000000-0000-0000-0000-00000000000d'
  ),
  0::bigint, 'a balance in debt should leave every bucket empty'
);
set local role service_role;
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-00000000000d', 1, 'debt-use')$$,
  $$values ('insufficient_funds'::text)$$,
  'usage should be refused while the balance is in debt'
);
select results_eq(
  $$select status, balance from public.add_tokens('00000000-0000-0000-0000-00000000000d', 100, 'debt-pay')$$,
  $$values ('applied'::text, 40::bigint)$$,
  'a credit should first pay off the debt'
);
reset role;
select results_eq(
  $$select b.amount, b.remaining from billing.credit_buckets as b
    join billing.ledger_entries as e on e.id = b.entry_id where e.idempotency_key = 'debt-pay'$$,
  $$values (40::bigint, 40::bigint)$$,
  'the bucket of a credit in debt should hold only what is left after the debt'
);
set local role service_role;
select results_eq(
  $$select status, balance from public.deduct_tokens('00000000-0000-0000-0000-00000000000d', 40, 'debt-use-2')$$,
  $$values ('applied'::text, 0::bigint)$$,
  'usage should resume once a credit brings the balance above zero'
);
reset role;

-- Ledger shape and invariants ------------------------------------------------------------------------
select is_empty(
  $$select id from billing.ledger_entries where sign(amount) <> case
      when kind in ('usage', 'expiry', 'clawback', 'dispute') then -1 else 1 end$$,
  'credits should be positive and debits negative'
);
select throws_ok(
  $$insert into billing.ledger_entries (user_id, amount, balance_after, kind, idempotency_key)
    values ('00000000-0000-0000-0000-00000000000d', 0, 0, 'usage', 'zero-check')$$,
  '23514', null, 'the table should refuse an entry of 0'
);
-- The sign of a kind is the writers' rule (no API role can write the table): an entry that broke
-- it, written here as the owner, is reported by check_invariants. The block raises TBSEE
-- once check_invariants reports the entry, which undoes the insert.
select throws_ok(
  $test$do $block$ begin
    insert into billing.ledger_entries (user_id, amount, balance_after, kind, idempotency_key)
    values ('00000000-0000-0000-0000-00000000000d', 5, 5, 'usage', 'sign-check');
    if exists (
      select 1 from billing.check_invariants() as i
      where i.problem like 'entry % usage 5 has the wrong sign%'
    ) then
      raise exception using errcode = 'TBSEE', message = 'reported';
    end if;
  end $block$$test$,
  'TBSEE', 'reported', 'check_invariants should report a usage entry with a positive amount'
);
select tests.invariants_hold('balances should equal entry sums, buckets the positive balance, after every case');
select is(
  tests.balance('00000000-0000-0000-0000-00000000000c'),
  (
    select sum(amount)::bigint from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-00000000000c'
  ),
  'the balance should equal the sum of the entries'
);

select * from finish();
rollback;
