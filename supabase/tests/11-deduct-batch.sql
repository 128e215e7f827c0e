-- deduct_tokens_batch: many debits in one transaction, each item exactly deduct_tokens; a
-- malformed item or a reused key refuses the whole batch. Its privileges are in
-- 02-privileges.sql, with every other function's.
begin;
set local search_path = extensions, public;
select plan(24);

-- Two users with the signup grant of 100 each.
select tests.create_user('00000000-0000-0000-0000-0000000000c1', 'c1@example.com');
select tests.create_user('00000000-0000-0000-0000-0000000000c2', 'c2@example.com');

set local role service_role;

-- Every account covers its items: the one-statement path.
create temporary table first_batch on commit drop as
select b.*
from public.deduct_tokens_batch($j$[
  {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 10, "idempotency_key": "db-1",
   "description": "call 1", "metadata": {"request": "r1"}},
  {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 30, "idempotency_key": "db-2"},
  {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 20, "idempotency_key": "db-3",
   "description": null, "metadata": null}
]$j$) as b;

select results_eq(
  $$select item, status, balance from first_batch order by item$$,
  $$values (0, 'applied'::text, 90::bigint), (1, 'applied', 70), (2, 'applied', 70)$$,
  'each item should be applied with the balance right after it, in item order per account'
);
select results_eq(
  $$
    select e.idempotency_key, e.amount, e.balance_after, e.kind, e.description, e.metadata
    from first_batch as b inner join billing.ledger_entries as e on b.entry_id = e.id
    order by b.item
  $$,
  $$values
    ('db-1'::text, -10::bigint, 90::bigint, 'usage'::text, 'call 1'::text,
      '{"request": "r1"}'::jsonb),
    ('db-2', -30, 70, 'usage', null, '{}'),
    ('db-3', -20, 70, 'usage', null, '{}')$$,
  'each item should write its own usage entry, as deduct_tokens does'
);
select ok(
  (
    select min(entry_id) filter (where item = 0) < min(entry_id) filter (where item = 2)
    from first_batch
  ),
  'an account''s entries should follow the items'' order'
);
select results_eq(
  $$
    select a.balance, a.undrawn from billing.accounts as a
    where a.user_id in (
      '00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-0000000000c2'
    )
    order by a.user_id
  $$,
  $$values (70::bigint, 30::bigint), (70, 30)$$,
  'the accounts should be debited by the sum of their items'
);

-- A replay: every key exists, so every item runs one by one and answers duplicate.
select results_eq(
  $$
    select b.item, b.status, b.balance, b.entry_id = f.entry_id
    from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 10, "idempotency_key": "db-1"},
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 30, "idempotency_key": "db-2"},
      {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 20, "idempotency_key": "db-3"}
    ]$j$) as b
    inner join first_batch as f on b.item = f.item
    order by b.item
  $$,
  $$values (0, 'duplicate'::text, 90::bigint, true), (1, 'duplicate', 70, true),
    (2, 'duplicate', 70, true)$$,
  'a replayed batch should answer duplicate with each item''s first result'
);
select is(
  tests.balance('00000000-0000-0000-0000-0000000000c1') + tests.balance('00000000-0000-0000-0000-0000000000c2'),
  140::bigint,
  'a replayed batch should charge nothing'
);

-- One new item next to a replayed one: the new one is applied, the old one is a duplicate.
select results_eq(
  $$
    select item, status, balance from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 5, "idempotency_key": "db-4"},
      {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 10, "idempotency_key": "db-1"}
    ]$j$) order by item
  $$,
  $$values (0, 'applied'::text, 65::bigint), (1, 'duplicate', 90)$$,
  'a batch mixing a new key and a replayed one should apply only the new one'
);

-- An account whose funds do not cover all its items: one by one, as deduct_tokens would.
select results_eq(
  $$
    select item, status, balance from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 50, "idempotency_key": "db-5"},
      {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 30, "idempotency_key": "db-6"},
      {"user_id": "00000000-0000-0000-0000-0000000000c1", "amount": 15, "idempotency_key": "db-7"},
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 10, "idempotency_key": "db-8"},
      {"user_id": "00000000-0000-0000-0000-000000000999", "amount": 1, "idempotency_key": "db-9"}
    ]$j$) order by item
  $$,
  $$values
    (0, 'applied'::text, 15::bigint),
    (1, 'insufficient_funds', 15),
    (2, 'applied', 0),
    (3, 'applied', 60),
    (4, 'unknown_account', null)$$,
  'each item should get the status deduct_tokens would give it at its turn'
);

-- The same key twice in one batch, with the same arguments: the second is its duplicate.
select results_eq(
  $$
    select item, status, balance from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1, "idempotency_key": "db-10"},
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1, "idempotency_key": "db-10"}
    ]$j$) order by item
  $$,
  $$values (0, 'applied'::text, 59::bigint), (1, 'duplicate', 59)$$,
  'a key given twice should apply once'
);
select is_empty(
  $$select * from public.deduct_tokens_batch('[]')$$,
  'an empty batch should answer no rows'
);

-- Refused batches change nothing.
create temporary table before_refusals on commit drop as
select
  (select count(*) from billing.ledger_entries) as entries,
  tests.balance('00000000-0000-0000-0000-0000000000c2') as balance;

select throws_ok(
  $$
    select * from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1, "idempotency_key": "db-11"},
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 2, "idempotency_key": "db-2"}
    ]$j$)
  $$,
  'TBKEY', null,
  'a key reused with another amount should refuse the whole batch with TBKEY'
);
select throws_ok(
  $$select * from public.deduct_tokens_batch('{"user_id": "x"}')$$,
  '22023', null, 'an object instead of an array should raise 22023'
);
select throws_ok(
  $$select * from public.deduct_tokens_batch(null)$$,
  '22023', null, 'a null batch should raise 22023'
);
select throws_ok(
  $$
    select * from public.deduct_tokens_batch((
      select jsonb_agg(jsonb_build_object(
        'user_id', '00000000-0000-0000-0000-0000000000c2', 'amount', 1,
        'idempotency_key', 'db-many-' || n))
      from generate_series(1, 1001) as n
    ))
  $$,
  '22023', 'p_items takes at most 1000 items, got 1001',
  'more than 1000 items should raise 22023'
);
select throws_ok(
  $$
    select * from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1, "idempotency_key": "db-12"},
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 0, "idempotency_key": "db-13"}
    ]$j$)
  $$,
  '22023',
  'p_items[1] amount must be a positive integer of at most 10^15, got {"amount": 0, '
  || '"user_id": "00000000-0000-0000-0000-0000000000c2", "idempotency_key": "db-13"}',
  'a non-positive amount should refuse the batch, naming the item'
);
select throws_like(
  $$
    select * from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1.5, "idempotency_key": "db-14"}
    ]$j$)
  $$,
  'p_items[0] amount must be a positive integer%',
  'a fractional amount should refuse the batch'
);
select throws_like(
  $$
    select * from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1}
    ]$j$)
  $$,
  'p_items[0] idempotency_key must be a non-empty text%',
  'an item without a key should refuse the batch'
);
select throws_like(
  $$
    select * from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1,
       "idempotency_key": "expiry:1"}
    ]$j$)
  $$,
  'p_items[0] idempotency_key must not start with signup:, expiry:, reservation: or stripe:%',
  'a key in token-billing''s own namespaces should refuse the batch'
);
select throws_like(
  $$
    select * from public.deduct_tokens_batch($j$[
      {"user_id": "not-a-uuid", "amount": 1, "idempotency_key": "db-15"}
    ]$j$)
  $$,
  'p_items[0] user_id must be a uuid%',
  'an item without a uuid should refuse the batch'
);
select throws_like(
  $$
    select * from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1,
       "idempotency_key": "db-16", "metadata": [1]}
    ]$j$)
  $$,
  'p_items[0] metadata must be a JSON object or null%',
  'metadata that is not an object should refuse the batch'
);
select throws_like(
  $$
    select * from public.deduct_tokens_batch($j$[
      {"user_id": "00000000-0000-0000-0000-0000000000c2", "amount": 1,
       "idempotency_key": "db-17", "idempotencyKey": "db-17"}
    ]$j$)
  $$,
  'p_items[0] takes only user_id, amount, idempotency_key, description and metadata%',
  'an unknown field (a misspelt one) should refuse the batch'
);
select results_eq(
  $$
    select (select count(*) from billing.ledger_entries) - b.entries,
      tests.balance('00000000-0000-0000-0000-0000000000c2') - b.balance
    from before_refusals as b
  $$,
  $$values (0::bigint, 0::bigint)$$,
  'a refused batch should write nothing and charge nothing'
);

reset role;
select tests.invariants_hold('balances should equal entry sums after every batch');

-- The writers' rules the ledger's CHECK no longer holds are reported by check_invariants()
-- (an owner's direct insert, which no API role can make).
insert into billing.ledger_entries (user_id, amount, balance_after, kind, idempotency_key)
values
('00000000-0000-0000-0000-0000000000c2', -1, 58, 'usage', 'expiry:42'),
('00000000-0000-0000-0000-0000000000c2', 1, 59, 'bonus', 'db-bonus');
select results_eq(
  $$
    select problem from billing.check_invariants()
    where problem like '%expiry:42%' or problem like '%bonus%'
    order by problem
  $$,
  $$
    select format(
      'entry %s: key expiry:42 is in token-billing''s namespace but not its entry', e.id)
    from billing.ledger_entries as e where e.idempotency_key = 'expiry:42'
    union all
    select format('entry %s: kind bonus is not a known kind', e.id)
    from billing.ledger_entries as e where e.idempotency_key = 'db-bonus'
    order by 1
  $$,
  'check_invariants should report an unknown kind and a key in token-billing''s namespace'
);

select * from finish();
rollback;
