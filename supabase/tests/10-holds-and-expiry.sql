-- Holds that meet expiry, long work, retries and settling for 0: every status, every timing,
-- with an explicit as_of. A pending hold keeps the tokens it covers; expiry takes the rest; what
-- a hold later lets go of an expired bucket leaves then, as an expiry entry of its own.
begin;
set local search_path = extensions, public;
select plan(58);

-- Users: 1201 the issue's case, 1202 a hold over part of an expiring bucket, 1203 release and
-- TTL after the bucket expired, 1204 overrun and debt, 1205 settle for 0, 1206 extend and
-- retries, 1207 a clawback that takes held tokens.
select tests.create_user('00000000-0000-0000-0000-000000001201');
select tests.create_user('00000000-0000-0000-0000-000000001202');
select tests.create_user('00000000-0000-0000-0000-000000001203');
select tests.create_user('00000000-0000-0000-0000-000000001204');
select tests.create_user('00000000-0000-0000-0000-000000001205');
select tests.create_user('00000000-0000-0000-0000-000000001206');
select tests.create_user('00000000-0000-0000-0000-000000001207');

create function pg_temp.state(p_user_id uuid) returns table (balance bigint, reserved bigint, held_expired bigint)
language sql stable
as $$
  select a.balance, a.reserved, a.held_expired from billing.accounts as a where a.user_id = p_user_id
$$;

create function pg_temp.hold(p_key text) returns uuid
language sql stable
as $$
  select r.id from billing.reservations as r where r.idempotency_key = p_key
$$;

grant execute on function pg_temp.state(uuid) to service_role;
grant execute on function pg_temp.hold(text) to service_role;

set local role service_role;

-- 1201: the issue's case. The signup grant spent, 50 plan tokens expiring in an hour, all held.
select * from public.deduct_tokens('00000000-0000-0000-0000-000000001201', 100, 'h1-drain');
select * from public.add_tokens(
    '00000000-0000-0000-0000-000000001201', 50, 'h1-plan', 'subscription', null,
    now() + interval '1 hour'
  );
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001201', 50, 'h1-hold', interval '7 days'
  );
select results_eq(
  $$select expired_buckets, expired_reservations from public.expire_tokens(now() + interval '59 minutes')$$,
  $$values (0::bigint, 0::bigint)$$,
  'before its expiry at as_of the held bucket should not expire'
);
select results_eq(
  $$select expired_buckets, expired_reservations from public.expire_tokens(now() + interval '1 hour')$$,
  $$values (1::bigint, 0::bigint)$$,
  'at its expiry (as_of = expires_at) the bucket should expire'
);
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001201')$$,
  $$values (50::bigint, 50::bigint, 50::bigint)$$,
  'a pending hold should keep the expired bucket''s tokens it covers (balance 50, held 50)'
);
select is_empty(
  $$select 1 from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000001201' and kind = 'expiry'$$,
  'no expiry entry should be written for tokens a hold covers'
);
select results_eq(
  $$select status, balance from public.settle_reservation(pg_temp.hold('h1-hold'), 50)$$,
  $$values ('applied'::text, 0::bigint)$$,
  'settling the whole hold should charge it once and leave the balance at 0, not -50'
);
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001201')$$,
  $$values (0::bigint, 0::bigint, 0::bigint)$$,
  'after the settlement nothing should be held'
);
select results_eq(
  $$select count(*) from public.expire_tokens(now() + interval '2 hours') where expired_buckets = 0$$,
  $$values (1::bigint)$$,
  'expiring again should find nothing'
);

-- 1202: 50 expiring, 30 of them held: 20 expire at once, the settlement's unused 20 later.
select * from public.deduct_tokens('00000000-0000-0000-0000-000000001202', 100, 'h2-drain');
select * from public.add_tokens(
    '00000000-0000-0000-0000-000000001202', 50, 'h2-plan', 'subscription', null,
    now() + interval '1 hour'
  );
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001202', 30, 'h2-hold', interval '1 day'
  );
select * from public.expire_tokens(now() + interval '1 hour');
select results_eq(
  $$select amount, balance_after from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000001202' and kind = 'expiry'$$,
  $$values (-20::bigint, 30::bigint)$$,
  'expiry should take only what no hold covers, as an expiry entry'
);
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001202')$$,
  $$values (30::bigint, 30::bigint, 30::bigint)$$,
  'the covered 30 should stay in the balance, held'
);
select results_eq(
  $$select status, balance from public.settle_reservation(pg_temp.hold('h2-hold'), 10)$$,
  $$values ('applied'::text, 0::bigint)$$,
  'a settlement below the hold should charge it and let the rest of the expired tokens go'
);
select results_eq(
  $$select kind, amount, balance_after, idempotency_key from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000001202' and id > (
      select id from billing.ledger_entries where idempotency_key = 'expiry:' || (
        select b.id from billing.credit_buckets as b
        inner join billing.ledger_entries as e on b.entry_id = e.id
        where e.idempotency_key = 'h2-plan'
      )::text
    ) order by id$$,
  $$values
    ('usage'::text, -10::bigint, 20::bigint, 'reservation:' || pg_temp.hold('h2-hold')::text),
    ('expiry'::text, -20::bigint, 0::bigint, 'expiry:held:' || pg_temp.hold('h2-hold')::text)$$,
  'the charge and then the released expired tokens should each be an entry of their own'
);
select results_eq(
  $$select status from public.settle_reservation(pg_temp.hold('h2-hold'), 10)$$,
  $$values ('duplicate'::text)$$,
  'a retried settlement should be a duplicate and write nothing'
);

-- 1203: a release after the bucket expired, and a hold whose TTL runs out after it.
select * from public.deduct_tokens('00000000-0000-0000-0000-000000001203', 100, 'h3-drain');
select * from public.add_tokens(
    '00000000-0000-0000-0000-000000001203', 60, 'h3-plan', 'subscription', null,
    now() + interval '1 hour'
  );
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001203', 25, 'h3-release', interval '1 day'
  );
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001203', 25, 'h3-ttl', interval '2 hours'
  );
select results_eq(
  $$select expired_buckets, expired_reservations from public.expire_tokens(now() + interval '1 hour')$$,
  $$values (1::bigint, 0::bigint)$$,
  'the bucket should expire while both holds are pending'
);
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001203')$$,
  $$values (50::bigint, 50::bigint, 50::bigint)$$,
  'both holds should keep their 50 tokens, the unheld 10 gone'
);
select results_eq(
  $$select status, available from public.release_reservation(pg_temp.hold('h3-release'))$$,
  $$values ('applied'::text, 0::bigint)$$,
  'a release should lift the hold; the tokens it held leave at once (available stays 0)'
);
select results_eq(
  $$select amount, balance_after from billing.ledger_entries
    where idempotency_key = 'expiry:held:' || pg_temp.hold('h3-release')::text$$,
  $$values (-25::bigint, 25::bigint)$$,
  'the released expired tokens should leave as an expiry entry keyed by the hold'
);
select results_eq(
  $$select status from public.release_reservation(pg_temp.hold('h3-release'))$$,
  $$values ('duplicate'::text)$$,
  'a retried release should be a duplicate and expire nothing twice'
);
select results_eq(
  $$select expired_buckets, expired_reservations
    from public.expire_tokens(now() + interval '2 hours' - interval '1 second')$$,
  $$values (0::bigint, 0::bigint)$$,
  'a hold should not expire before its TTL at as_of'
);
select results_eq(
  $$select expired_buckets, expired_reservations from public.expire_tokens(now() + interval '2 hours')$$,
  $$values (0::bigint, 1::bigint)$$,
  'a hold should expire at its TTL (as_of = expires_at)'
);
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001203')$$,
  $$values (0::bigint, 0::bigint, 0::bigint)$$,
  'the expired hold''s expired tokens should have left'
);
select results_eq(
  $$select amount, balance_after from billing.ledger_entries
    where idempotency_key = 'expiry:held:' || pg_temp.hold('h3-ttl')::text$$,
  $$values (-25::bigint, 0::bigint)$$,
  'an expired hold''s expired tokens should leave as an expiry entry keyed by the hold'
);

-- 1204: an overrun above the hold comes from available; never below a zero balance.
select * from public.deduct_tokens('00000000-0000-0000-0000-000000001204', 80, 'h4-drain');
select * from public.add_tokens(
    '00000000-0000-0000-0000-000000001204', 50, 'h4-plan', 'subscription', null,
    now() + interval '1 hour'
  );
-- 70 tokens: 50 expiring, 20 of the signup grant never expiring. The hold covers the 50 first.
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001204', 50, 'h4-hold', interval '1 day'
  );
select * from public.expire_tokens(now() + interval '1 hour');
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001204')$$,
  $$values (70::bigint, 50::bigint, 50::bigint)$$,
  'a hold should cover the soonest-expiring tokens (nothing expired: all 50 held)'
);
select results_eq(
  $$select status, balance from public.settle_reservation(pg_temp.hold('h4-hold'), 65)$$,
  $$values ('applied'::text, 5::bigint)$$,
  'an overrun of 15 above the hold should come from the 20 available'
);
select * from public.reserve_tokens('00000000-0000-0000-0000-000000001204', 5, 'h4-hold-2');
select results_eq(
  $$select status, balance from public.settle_reservation(pg_temp.hold('h4-hold-2'), 9)$$,
  $$values ('partial'::text, 0::bigint)$$,
  'an overrun beyond available should be capped at a zero balance (partial)'
);
-- Debt (a clawback) while a hold is pending: the settlement takes what is left, never more.
select * from public.add_tokens('00000000-0000-0000-0000-000000001204', 40, 'h4-more', 'purchase');
select * from public.reserve_tokens('00000000-0000-0000-0000-000000001204', 30, 'h4-hold-3');
select * from public.reserve_tokens('00000000-0000-0000-0000-000000001204', 10, 'h4-hold-4');
reset role;
select * from billing.debit(
    '00000000-0000-0000-0000-000000001204', 25, 'h4-clawback', 'clawback', null, '{}', true
  );
set local role service_role;
select results_eq(
  $$select status, balance, entry_id is not null
    from public.settle_reservation(pg_temp.hold('h4-hold-3'), 30)$$,
  $$values ('partial'::text, 0::bigint, true)$$,
  'a settlement after a clawback should charge only the 15 left, not go below zero'
);
select results_eq(
  $$select status, balance, entry_id from public.settle_reservation(pg_temp.hold('h4-hold-4'), 10)$$,
  $$values ('partial'::text, 0::bigint, null::bigint)$$,
  'with nothing left, a settlement should charge 0 and write no entry (partial)'
);
select results_eq(
  $$select status, balance, entry_id from public.settle_reservation(pg_temp.hold('h4-hold-4'), 10)$$,
  $$values ('duplicate'::text, 0::bigint, null::bigint)$$,
  'its retry should be a duplicate without an entry'
);

-- 1205: settling for 0 charges nothing, releases the hold, answers applied.
select * from public.reserve_tokens('00000000-0000-0000-0000-000000001205', 40, 'h5-hold');
select results_eq(
  $$select status, balance, entry_id from public.settle_reservation(pg_temp.hold('h5-hold'), 0)$$,
  $$values ('applied'::text, 100::bigint, null::bigint)$$,
  'settling for 0 should answer applied and charge nothing'
);
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001205')$$,
  $$values (100::bigint, 0::bigint, 0::bigint)$$,
  'settling for 0 should release the hold'
);
select results_eq(
  $$select status, settle_amount from billing.reservations where id = pg_temp.hold('h5-hold')$$,
  $$values ('settled'::text, 0::bigint)$$,
  'the hold should be settled for 0'
);
select results_eq(
  $$select status from public.settle_reservation(pg_temp.hold('h5-hold'), 0)$$,
  $$values ('duplicate'::text)$$,
  'settling for 0 again should be a duplicate'
);
select results_eq(
  $$select status from public.settle_reservation(pg_temp.hold('h5-hold'), 3)$$,
  $$values ('not_pending'::text)$$,
  'settling it for another amount should answer not_pending'
);
select throws_ok(
  $$select * from public.settle_reservation(pg_temp.hold('h5-hold'), -1)$$,
  '22023', 'p_amount must be an integer from 0 to 10^15, got -1',
  'a negative settlement should raise 22023 naming the amount'
);
-- Expiry with a hold settled for 0 in the batch form too.
select * from public.reserve_tokens('00000000-0000-0000-0000-000000001205', 10, 'h5-batch');
select results_eq(
  $$select status, entry_id from public.settle_reservations(
      jsonb_build_array(jsonb_build_object('reservation_id', pg_temp.hold('h5-batch'), 'amount', 0)))$$,
  $$values ('applied'::text, null::bigint)$$,
  'settle_reservations should settle for 0 as settle_reservation does'
);

-- 1206: long work extends its hold; a retried key answers duplicate, get_reservation the outcome.
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001206', 20, 'h6-hold', interval '10 minutes'
  );
select results_eq(
  $$select status, expires_at from public.extend_reservation(pg_temp.hold('h6-hold'), interval '1 hour')$$,
  $$values ('applied'::text, now() + interval '1 hour')$$,
  'extending a pending hold should move its expiry to now() + ttl'
);
select results_eq(
  $$select status, expires_at from public.extend_reservation(pg_temp.hold('h6-hold'), interval '30 minutes')$$,
  $$values ('duplicate'::text, now() + interval '1 hour')$$,
  'an extension that would not move the expiry later should be a duplicate and change nothing'
);
select results_eq(
  $$select status, expires_at from public.extend_reservation(pg_temp.hold('h6-hold'), interval '1 hour')$$,
  $$values ('duplicate'::text, now() + interval '1 hour')$$,
  'the same extension again should be a duplicate'
);
select results_eq(
  $$select expired_reservations from public.expire_tokens(now() + interval '30 minutes')$$,
  $$values (0::bigint)$$,
  'an extended hold should outlive its first TTL at as_of'
);
select results_eq(
  $$select status, reservation_id from public.reserve_tokens(
      '00000000-0000-0000-0000-000000001206', 20, 'h6-hold', interval '10 minutes')$$,
  $$values ('duplicate'::text, pg_temp.hold('h6-hold'))$$,
  'a retried reservation of an extended pending hold should still be its duplicate (first TTL)'
);
select throws_ok(
  $$select * from public.extend_reservation(pg_temp.hold('h6-hold'), interval '8 days')$$,
  '22023', null, 'an extension beyond 7 days should raise 22023'
);
select throws_ok(
  $$select * from public.extend_reservation(pg_temp.hold('h6-hold'), null)$$,
  '22023', null, 'an extension without a TTL should raise 22023'
);
select throws_ok(
  $$select * from public.extend_reservation('00000000-0000-0000-0000-000000000999', interval '1 hour')$$,
  'TBRES', null, 'extending an unknown reservation should raise TBRES'
);
select * from public.settle_reservation(pg_temp.hold('h6-hold'), 12);
select results_eq(
  $$select status from public.extend_reservation(pg_temp.hold('h6-hold'), interval '2 hours')$$,
  $$values ('not_pending'::text)$$,
  'extending a settled hold should answer not_pending'
);
select results_eq(
  $$select status, reservation_id from public.reserve_tokens(
      '00000000-0000-0000-0000-000000001206', 20, 'h6-hold', interval '10 minutes')$$,
  $$values ('duplicate'::text, pg_temp.hold('h6-hold'))$$,
  'reserving with the key of a settled hold should answer duplicate with that hold''s id'
);
select results_eq(
  $$select status, amount, settle_amount, charged, entry_id is not null
    from public.get_reservation(pg_temp.hold('h6-hold'))$$,
  $$values ('settled'::text, 20::bigint, 12::bigint, 12::bigint, true)$$,
  'get_reservation should tell what the settled hold charged'
);
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001206')$$,
  $$values (88::bigint, 0::bigint, 0::bigint)$$,
  'the retried key should have held and charged nothing more'
);
select * from public.reserve_tokens('00000000-0000-0000-0000-000000001206', 5, 'h6-released');
select * from public.release_reservation(pg_temp.hold('h6-released'));
select results_eq(
  $$select r.status, r.reservation_id, g.status
    from public.reserve_tokens('00000000-0000-0000-0000-000000001206', 5, 'h6-released') as r
    cross join lateral public.get_reservation(r.reservation_id) as g$$,
  $$values ('duplicate'::text, pg_temp.hold('h6-released'), 'released'::text)$$,
  'reserving with the key of a released hold should answer duplicate, its hold released'
);
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001206', 5, 'h6-expired', interval '1 minute'
  );
select * from public.expire_tokens(now() + interval '1 minute');
select results_eq(
  $$select status, reservation_id from public.reserve_tokens(
      '00000000-0000-0000-0000-000000001206', 5, 'h6-expired', interval '1 minute')$$,
  $$values ('duplicate'::text, pg_temp.hold('h6-expired'))$$,
  'reserving with the key of an expired hold should answer duplicate with that hold''s id'
);
select results_eq(
  $$select status, charged from public.get_reservation(pg_temp.hold('h6-expired'))$$,
  $$values ('expired'::text, null::bigint)$$,
  'get_reservation should tell an expired hold charged nothing'
);
select results_eq(
  $$select status from public.extend_reservation(pg_temp.hold('h6-expired'), interval '1 hour')$$,
  $$values ('not_pending'::text)$$,
  'extending an expired hold should answer not_pending'
);
select throws_ok(
  $$select * from public.reserve_tokens(
      '00000000-0000-0000-0000-000000001206', 5, 'h6-expired', interval '2 minutes')$$,
  'TBKEY', null, 'a resolved hold''s key with another TTL should still raise TBKEY'
);
select is_empty(
  $$select * from public.get_reservation('00000000-0000-0000-0000-000000000999')$$,
  'get_reservation of an unknown id should return no row'
);
reset role;
select throws_ok(
  $$update billing.reservations set expires_at = expires_at - interval '1 minute'
    where idempotency_key = 'h6-expired'$$,
  'TBAPP', null, 'a resolved hold''s expiry should not be editable, even by the owner'
);
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001206', 5, 'h6-pending', interval '1 minute'
  );
select throws_ok(
  $$update billing.reservations set expires_at = expires_at - interval '1 second'
    where idempotency_key = 'h6-pending'$$,
  'TBAPP', null, 'a pending hold''s expiry should only move later'
);
set local role service_role;

-- 1207: a clawback that takes tokens held from an expired bucket; the next credit draws it.
select * from public.deduct_tokens('00000000-0000-0000-0000-000000001207', 100, 'h7-drain');
select * from public.add_tokens(
    '00000000-0000-0000-0000-000000001207', 50, 'h7-plan', 'subscription', null,
    now() + interval '1 hour'
  );
select * from public.reserve_tokens(
    '00000000-0000-0000-0000-000000001207', 50, 'h7-hold', interval '1 day'
  );
select * from public.expire_tokens(now() + interval '1 hour');
reset role;
select * from billing.debit(
    '00000000-0000-0000-0000-000000001207', 80, 'h7-clawback', 'clawback', null, '{}', true
  );
set local role service_role;
select * from public.add_tokens('00000000-0000-0000-0000-000000001207', 100, 'h7-credit', 'purchase');
select results_eq(
  $$select * from pg_temp.state('00000000-0000-0000-0000-000000001207')$$,
  $$values (70::bigint, 50::bigint, 0::bigint)$$,
  'a clawback beyond the buckets should take the held expired tokens when drawn'
);
select results_eq(
  $$select status, balance from public.settle_reservation(pg_temp.hold('h7-hold'), 50)$$,
  $$values ('applied'::text, 20::bigint)$$,
  'the hold should then be charged from the new tokens'
);
reset role;

select is_empty(
  $$select * from billing.ledger_entries where kind in ('usage', 'expiry') and balance_after < 0$$,
  'no usage or expiry entry should have left a balance below zero'
);
select tests.invariants_hold('the invariants should hold after holds met expiry');

select * from finish();
rollback;
