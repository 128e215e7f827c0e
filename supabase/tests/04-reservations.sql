-- Reservations: reserve, then settle, release or expire, exactly once; every status.
begin;
set local search_path = extensions, public;
select plan(37);

select tests.create_user('00000000-0000-0000-0000-0000000000e1', 'e1@example.com');
select tests.create_user('00000000-0000-0000-0000-0000000000e2', 'e2@example.com');

set local role service_role;

select results_eq(
  $$select status, available from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 30, 'rsv-1')$$,
  $$values ('applied'::text, 70::bigint)$$,
  'reserve_tokens should hold tokens and answer the available rest'
);
select results_eq(
  $$select status, reservation_id, available
    from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 30, 'rsv-1')$$,
  $$select 'duplicate'::text, id, 70::bigint from billing.reservations where idempotency_key = 'rsv-1'$$,
  'a retried reservation should return the first reservation as duplicate'
);
select throws_ok(
  $$select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 31, 'rsv-1')$$,
  'TBKEY', null, 'a reservation key reused with another amount should raise TBKEY'
);
select results_eq(
  $$select balance, reserved from billing.accounts where user_id = '00000000-0000-0000-0000-0000000000e1'$$,
  $$values (100::bigint, 30::bigint)$$,
  'a hold should count in reserved, not in the balance'
);
select results_eq(
  $$select status, reservation_id, available
    from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 71, 'rsv-2')$$,
  $$values ('insufficient_funds'::text, null::uuid, 70::bigint)$$,
  'a hold above the available tokens should answer insufficient_funds'
);
select results_eq(
  $$select status from public.reserve_tokens('00000000-0000-0000-0000-0000000000ff', 1, 'rsv-3')$$,
  $$values ('unknown_account'::text)$$,
  'a hold for a user without an account should answer unknown_account'
);
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-0000000000e1', 71, 'use-over-hold')$$,
  $$values ('insufficient_funds'::text)$$,
  'usage should not spend tokens held by a reservation'
);
select throws_ok(
  $$select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 0, 'rsv-4')$$,
  '22023', null, 'a zero hold should raise 22023'
);
select throws_ok(
  $$select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 5, 'rsv-5', '-1 minute')$$,
  '22023', null, 'a negative TTL should raise 22023'
);
select throws_ok(
  $$select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 5, 'rsv-6', null)$$,
  '22023', null, 'a null TTL should raise 22023'
);
select throws_ok(
  $$select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 5, null)$$,
  '22023', null, 'a null reservation key should raise 22023'
);

-- Settle within the hold.
select results_eq(
  $$select r.status, r.balance from billing.reservations as v,
    lateral public.settle_reservation(v.id, 25) as r where v.idempotency_key = 'rsv-1'$$,
  $$values ('applied'::text, 75::bigint)$$,
  'settling below the hold should charge the actual amount'
);
select results_eq(
  $$select balance, reserved from billing.accounts where user_id = '00000000-0000-0000-0000-0000000000e1'$$,
  $$values (75::bigint, 0::bigint)$$,
  'settling should release what was not charged'
);
select results_eq(
  $$select r.status, r.balance from billing.reservations as v,
    lateral public.settle_reservation(v.id, 25) as r where v.idempotency_key = 'rsv-1'$$,
  $$values ('duplicate'::text, 75::bigint)$$,
  'settling again with the same amount should be a duplicate'
);
select results_eq(
  $$select r.status from billing.reservations as v,
    lateral public.settle_reservation(v.id, 26) as r where v.idempotency_key = 'rsv-1'$$,
  $$values ('not_pending'::text)$$,
  'settling a settled reservation with another amount should answer not_pending'
);
select results_eq(
  $$select r.status from billing.reservations as v,
    lateral public.release_reservation(v.id) as r where v.idempotency_key = 'rsv-1'$$,
  $$values ('not_pending'::text)$$,
  'releasing a settled reservation should answer not_pending'
);
select is(
  (
    select count(*)::int from billing.ledger_entries as e
    inner join billing.reservations as r on e.reservation_id = r.id
    where r.idempotency_key = 'rsv-1'
  ),
  1, 'a reservation should be charged exactly once'
);

-- Settle above the hold: the excess comes from available, capped at zero.
select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 10, 'rsv-7');
select results_eq(
  $$select r.status, r.balance from billing.reservations as v,
    lateral public.settle_reservation(v.id, 30) as r where v.idempotency_key = 'rsv-7'$$,
  $$values ('applied'::text, 45::bigint)$$,
  'settling above the hold should take the excess from available when there is enough'
);
select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 20, 'rsv-8');
select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 15, 'rsv-9');
select results_eq(
  $$select r.status, r.balance from billing.reservations as v,
    lateral public.settle_reservation(v.id, 500) as r where v.idempotency_key = 'rsv-8'$$,
  $$values ('partial'::text, 15::bigint)$$,
  'settling far above the hold should be capped at available (partial), sparing other holds'
);
select results_eq(
  $$select balance, reserved, balance - reserved from billing.accounts
    where user_id = '00000000-0000-0000-0000-0000000000e1'$$,
  $$values (15::bigint, 15::bigint, 0::bigint)$$,
  'a capped settlement should never take available below zero'
);
select results_eq(
  $$select -amount from billing.ledger_entries where idempotency_key = 'reservation:' ||
    (select id from billing.reservations where idempotency_key = 'rsv-8')::text$$,
  $$values (30::bigint)$$,
  'the settlement entry should record what was actually charged'
);

-- Release.
select results_eq(
  $$select r.status, r.available from billing.reservations as v,
    lateral public.release_reservation(v.id) as r where v.idempotency_key = 'rsv-9'$$,
  $$values ('applied'::text, 15::bigint)$$,
  'releasing should return the hold to available'
);
select results_eq(
  $$select r.status, r.available from billing.reservations as v,
    lateral public.release_reservation(v.id) as r where v.idempotency_key = 'rsv-9'$$,
  $$values ('duplicate'::text, 15::bigint)$$,
  'releasing again should be a duplicate'
);
select results_eq(
  $$select r.status from billing.reservations as v,
    lateral public.settle_reservation(v.id, 5) as r where v.idempotency_key = 'rsv-9'$$,
  $$values ('not_pending'::text)$$,
  'settling a released reservation should answer not_pending'
);
select is(
  (
    select count(*)::int from billing.ledger_entries as e
    inner join billing.reservations as r on e.reservation_id = r.id
    where r.idempotency_key = 'rsv-9'
  ),
  0, 'a released reservation should charge nothing'
);

-- Unknown reservations and bad amounts.
select throws_ok(
  $$select * from public.settle_reservation('00000000-0000-0000-0000-000000000999', 5)$$,
  'TBRES', 'reservation 00000000-0000-0000-0000-000000000999 not found',
  'settling an unknown reservation should raise TBRES naming it'
);
select throws_ok(
  $$select * from public.release_reservation('00000000-0000-0000-0000-000000000999')$$,
  'TBRES', null, 'releasing an unknown reservation should raise TBRES'
);
select throws_ok(
  $$select * from public.settle_reservation(null, 5)$$,
  'TBRES', null, 'settling a null reservation should raise TBRES'
);
select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000e1', 5, 'rsv-10');
select throws_ok(
  $$select r.* from billing.reservations as v, lateral public.settle_reservation(v.id, -1) as r
    where v.idempotency_key = 'rsv-10'$$,
  '22023', null, 'settling a negative amount should raise 22023 (0 is allowed: 10-holds-and-expiry.sql)'
);
select throws_ok(
  $$select r.* from billing.reservations as v, lateral public.settle_reservation(v.id, null) as r
    where v.idempotency_key = 'rsv-10'$$,
  '22023', null, 'settling a null amount should raise 22023'
);
select is(
  (
    select status from billing.reservations
    where idempotency_key = 'rsv-10'
  ), 'pending',
  'a refused settlement should leave the reservation pending'
);
reset role;

-- Never edited: only the one transition out of pending.
select throws_ok(
  $$update billing.reservations set amount = 1 where idempotency_key = 'rsv-10'$$,
  'TBAPP', null, 'a pending reservation''s amount should not be editable, even by the owner'
);
select throws_ok(
  $$update billing.reservations set status = 'pending', resolved_at = null, settle_amount = null
    where idempotency_key = 'rsv-1'$$,
  'TBAPP', null, 'a settled reservation should never return to pending'
);
select throws_ok(
  $$delete from billing.reservations where idempotency_key = 'rsv-1'$$,
  'TBAPP', null, 'a reservation should never be deleted'
);

-- Another user's reservation is invisible to a signed-in user.
select set_config('request.jwt.claims', '{"sub": "00000000-0000-0000-0000-0000000000e2"}', true);
set local role authenticated;
select is_empty(
  $$select 1 from billing.reservations$$,
  'another user should see none of the owner''s reservations'
);
reset role;
select set_config('request.jwt.claims', '{"sub": "00000000-0000-0000-0000-0000000000e1"}', true);
set local role authenticated;
select is(
  (select count(*)::int from billing.reservations), 5,
  'the owner should see the own reservations'
);
reset role;

select tests.invariants_hold('reserved should equal the pending holds and balances the entries after every case');

select * from finish();
rollback;
