-- expire_tokens(as_of): expiry entries for expired remainders, holds past their TTL released.
begin;
set local search_path = extensions, public;
select plan(17);

select tests.create_user('00000000-0000-0000-0000-0000000000f1', 'f1@example.com');

set local role service_role;
select * from public.add_tokens(
    '00000000-0000-0000-0000-0000000000f1', 50, 'exp-3d', 'promotion',
    null, now() + interval '3 days'
  );
select * from public.add_tokens(
    '00000000-0000-0000-0000-0000000000f1', 40, 'exp-5d', 'subscription',
    null, now() + interval '5 days'
  );
-- 30 come out of the 3-day bucket (soonest expiry first): 20 of it are left to expire.
select * from public.deduct_tokens('00000000-0000-0000-0000-0000000000f1', 30, 'exp-use');

select results_eq(
  $$select expired_buckets, expired_reservations from public.expire_tokens(now())$$,
  $$values (0::bigint, 0::bigint)$$,
  'nothing should expire before its time'
);
select results_eq(
  $$select expired_buckets from public.expire_tokens(now() + interval '4 days')$$,
  $$values (1::bigint)$$,
  'the bucket past its expiry at as_of should expire, and only that one'
);
reset role;
select results_eq(
  $$select amount, balance_after, kind from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-0000000000f1' and kind = 'expiry'$$,
  $$values (-20::bigint, 140::bigint, 'expiry'::text)$$,
  'only the unused remainder should leave the balance, as an expiry entry of its own'
);
select results_eq(
  $$select b.remaining, b.expired_at is not null from billing.credit_buckets as b
    join billing.ledger_entries as e on e.id = b.entry_id where e.idempotency_key = 'exp-3d'$$,
  $$values (0::bigint, true)$$,
  'the expired bucket should be empty and marked'
);
set local role service_role;
select results_eq(
  $$select expired_buckets from public.expire_tokens(now() + interval '4 days')$$,
  $$values (0::bigint)$$,
  'running expiry again should change nothing'
);
select results_eq(
  $$select expired_buckets from public.expire_tokens(now() + interval '6 days')$$,
  $$values (1::bigint)$$,
  'the later bucket should expire at its own time'
);
reset role;
select is(
  tests.balance('00000000-0000-0000-0000-0000000000f1'), 100::bigint,
  'after both expiries only the never-expiring signup grant should remain'
);
select is(
  (
    select count(*)::int from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-0000000000f1' and kind = 'expiry'
  ),
  2, 'each expired bucket should have exactly one expiry entry'
);

-- Reservations past their TTL.
set local role service_role;
select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000f1', 30, 'exp-hold', '1 minute');
select * from public.reserve_tokens('00000000-0000-0000-0000-0000000000f1', 10, 'exp-hold-long', '1 hour');
select results_eq(
  $$select expired_reservations from public.expire_tokens(now() + interval '2 minutes')$$,
  $$values (1::bigint)$$,
  'a hold past its TTL should expire, and only that one'
);
reset role;
select results_eq(
  $$select status from billing.reservations where idempotency_key = 'exp-hold'$$,
  $$values ('expired'::text)$$,
  'the expired hold should have status expired'
);
select results_eq(
  $$select balance, reserved from billing.accounts where user_id = '00000000-0000-0000-0000-0000000000f1'$$,
  $$values (100::bigint, 10::bigint)$$,
  'an expired hold should be released without a charge'
);
set local role service_role;
select results_eq(
  $$select r.status from billing.reservations as v,
    lateral public.settle_reservation(v.id, 5) as r where v.idempotency_key = 'exp-hold'$$,
  $$values ('not_pending'::text)$$,
  'settling an expired hold should answer not_pending'
);
select results_eq(
  $$select r.status from billing.reservations as v,
    lateral public.release_reservation(v.id) as r where v.idempotency_key = 'exp-hold'$$,
  $$values ('not_pending'::text)$$,
  'releasing an expired hold should answer not_pending'
);
select results_eq(
  $$select expired_buckets, expired_reservations from public.expire_tokens(now() + interval '2 minutes')$$,
  $$values (0::bigint, 0::bigint)$$,
  'expiring again should find nothing'
);
select throws_ok(
  $$select * from public.expire_tokens(null)$$,
  '22023', null, 'a null as_of should raise 22023'
);
reset role;

select is(
  (
    select count(*)::int from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-0000000000f1' and kind = 'usage'
  ),
  1, 'an expired hold should write no usage entry'
);
select tests.invariants_hold('the invariants should hold after expiry');

select * from finish();
rollback;
