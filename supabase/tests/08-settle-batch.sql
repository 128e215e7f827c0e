-- settle_reservations: many settlements in one transaction, each exactly settle_reservation;
-- a bad item or an unknown reservation refuses the whole batch. Its privileges are in
-- 02-privileges.sql, with every other function's.
begin;
set local search_path = extensions, public;
select plan(19);

select tests.create_user('00000000-0000-0000-0000-0000000000b1', 'b1@example.com');
select tests.create_user('00000000-0000-0000-0000-0000000000b2', 'b2@example.com');

set local role service_role;

-- b1: two holds of 30; b2: one hold of 50 (both start with the signup grant of 100).
select lives_ok(
  $$
    select r.status
    from (values
      ('00000000-0000-0000-0000-0000000000b1'::uuid, 30::bigint, 'batch-1'),
      ('00000000-0000-0000-0000-0000000000b1', 30, 'batch-2'),
      ('00000000-0000-0000-0000-0000000000b2', 50, 'batch-3')
    ) as v (user_id, amount, key),
      lateral public.reserve_tokens(v.user_id, v.amount, v.key) as r
  $$,
  'three holds on two accounts'
);

-- The settlements as a JSON array: 25 of b1's first hold, 45 of its second (15 above the
-- hold, from b1's 40 available tokens), 80 of b2's 50 (30 above, b2 has 50 available).
create temporary table batch on commit drop as
select
  jsonb_agg(
    jsonb_build_object('reservation_id', r.id, 'amount', v.amount) order by v.key
  ) as settlements
from (values ('batch-1', 25), ('batch-2', 45), ('batch-3', 80)) as v (key, amount)
inner join billing.reservations as r on v.key = r.idempotency_key;

-- b1's two items run in reservation id order, so each row's balance depends on that order;
-- the statuses, each row against its own entry, and the final balances do not.
create temporary table settled on commit drop as
select s.*
from batch, public.settle_reservations(batch.settlements) as s;

select results_eq(
  $$
    select r.idempotency_key, s.status, s.balance = e.balance_after
    from settled as s
    inner join billing.reservations as r on s.reservation_id = r.id
    inner join billing.ledger_entries as e on s.entry_id = e.id
    order by r.idempotency_key
  $$,
  $$values
    ('batch-1'::text, 'applied'::text, true),
    ('batch-2', 'applied', true),
    ('batch-3', 'applied', true)$$,
  'each item should settle as settle_reservation does, with its entry''s balance after it'
);
select results_eq(
  $$
    select a.user_id::text, a.balance, a.reserved
    from billing.accounts as a
    where a.user_id in (
      '00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000b2'
    )
    order by a.user_id
  $$,
  $$values
    ('00000000-0000-0000-0000-0000000000b1'::text, 30::bigint, 0::bigint),
    ('00000000-0000-0000-0000-0000000000b2', 20, 0)$$,
  'the accounts should be charged and every hold released'
);
select is(
  (
    select count(*)::int from billing.ledger_entries
    where idempotency_key like 'reservation:%'
      and user_id in (
        '00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000b2'
      )
  ),
  3,
  'one ledger entry per settlement'
);
select results_eq(
  $$
    select s.status from batch, public.settle_reservations(batch.settlements) as s
    order by s.reservation_id
  $$,
  $$values ('duplicate'::text), ('duplicate'), ('duplicate')$$,
  'a replayed batch should answer duplicate for every item'
);
select is(
  (
    select sum(balance)::int from billing.accounts
    where user_id in (
        '00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000b2'
      )
  ),
  50,
  'a replayed batch should charge nothing'
);
select results_eq(
  $$
    select s.status, s.entry_id
    from billing.reservations as r,
      public.settle_reservations(jsonb_build_array(
        jsonb_build_object('reservation_id', r.id, 'amount', 26)
      )) as s
    where r.idempotency_key = 'batch-1'
  $$,
  $$values ('not_pending'::text, null::bigint)$$,
  'a settled reservation with another amount should answer not_pending'
);
select is_empty(
  $$select * from public.settle_reservations('[]')$$,
  'an empty batch should answer no rows'
);

-- Refused batches change nothing: one hold is left pending through all of them.
select lives_ok(
  $$select public.reserve_tokens('00000000-0000-0000-0000-0000000000b1', 10, 'batch-4')$$,
  'a fourth hold, to stay pending'
);
select throws_ok(
  $$
    select * from billing.reservations as r,
      public.settle_reservations(jsonb_build_array(
        jsonb_build_object('reservation_id', r.id, 'amount', 5),
        jsonb_build_object('reservation_id', '00000000-0000-0000-0000-000000000999', 'amount', 5)
      )) as s
    where r.idempotency_key = 'batch-4'
  $$,
  'TBRES', 'reservation 00000000-0000-0000-0000-000000000999 not found',
  'an unknown reservation should refuse the whole batch with TBRES'
);
select throws_ok(
  $$select * from public.settle_reservations('{"reservation_id": "x"}')$$,
  '22023', null, 'an object instead of an array should raise 22023'
);
select throws_ok(
  $$select * from public.settle_reservations(null)$$,
  '22023', null, 'a null batch should raise 22023'
);
select throws_ok(
  $$
    select * from billing.reservations as r,
      public.settle_reservations(jsonb_build_array(
        jsonb_build_object('reservation_id', r.id, 'amount', 5),
        jsonb_build_object('reservation_id', r.id)
      )) as s
    where r.idempotency_key = 'batch-4'
  $$,
  '22023', null, 'an item without an amount should refuse the whole batch with 22023'
);
select throws_like(
  $$select * from public.settle_reservations('[{"reservation_id": "not-a-uuid", "amount": 5}]')$$,
  'p_settlements[0] must be%', 'the error should name the position of the bad item'
);
select throws_ok(
  $$
    select * from public.settle_reservations(
      '[{"reservation_id": "00000000-0000-0000-0000-000000000999", "amount": 2.5}]')
  $$,
  '22023', null, 'a fractional amount should raise 22023'
);
select throws_ok(
  $$
    select * from billing.reservations as r,
      public.settle_reservations(jsonb_build_array(
        jsonb_build_object('reservation_id', r.id, 'amount', -1)
      )) as s
    where r.idempotency_key = 'batch-4'
  $$,
  '22023', null, 'a negative amount should raise 22023 as settle_reservation does'
);
select throws_ok(
  $$
    select * from public.settle_reservations((
      select jsonb_agg(jsonb_build_object(
        'reservation_id', '00000000-0000-0000-0000-000000000999', 'amount', 1))
      from generate_series(1, 1001)
    ))
  $$,
  '22023', 'p_settlements takes at most 1000 items, got 1001',
  'more than 1000 items should raise 22023'
);
select results_eq(
  $$select status, reserved from billing.reservations as r
    inner join billing.accounts as a on r.user_id = a.user_id
    where r.idempotency_key = 'batch-4'$$,
  $$values ('pending'::text, 10::bigint)$$,
  'the refused batches should have left the hold pending and reserved'
);

reset role;
select tests.invariants_hold('reserved should equal the pending holds and balances the entries after every batch');

select * from finish();
rollback;
