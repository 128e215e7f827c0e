-- The plain CHECKs of the hot tables (20261202400000_plain_checks.sql,
-- 20261202400300_plain_reservation_checks.sql) refuse what the function-backed ones refused,
-- nulls included, but for the ledger's sign rule, which check_invariants() reports; the kinds
-- issue 13 added pass them and check_invariants(). Run as the owner: no API role can write
-- these tables.
begin;
set local search_path = extensions, public;
select plan(15);

select tests.create_user('00000000-0000-0000-0000-0000000000d1', 'd1@example.com');

-- Accounts: reserved and undrawn not negative, held_expired within 0..reserved.
select throws_ok(
  $$update billing.accounts set reserved = -1
    where user_id = '00000000-0000-0000-0000-0000000000d1'$$,
  '23514', null, 'a negative reserved should be refused'
);
select throws_ok(
  $$update billing.accounts set undrawn = -1
    where user_id = '00000000-0000-0000-0000-0000000000d1'$$,
  '23514', null, 'a negative undrawn should be refused'
);
select throws_ok(
  $$update billing.accounts set held_expired = 1
    where user_id = '00000000-0000-0000-0000-0000000000d1'$$,
  '23514', null, 'held_expired beyond reserved should be refused'
);
select throws_ok(
  $$update billing.accounts set subscription_status = 'bogus'
    where user_id = '00000000-0000-0000-0000-0000000000d1'$$,
  '23503', null, 'an unknown subscription status should be refused'
);

-- Reservations: a status consistent with its resolution; a null is a violation, not a pass.
select throws_ok(
  $$insert into billing.reservations (
      user_id, amount, idempotency_key, status, available_after, expires_at, resolved_at)
    values ('00000000-0000-0000-0000-0000000000d1', 5, 'd1-settled-null', 'settled', 0,
      now() + interval '1 minute', now())$$,
  '23514', null, 'a settled hold without a settle_amount should be refused'
);
select throws_ok(
  $$insert into billing.reservations (
      user_id, amount, idempotency_key, status, available_after, expires_at)
    values ('00000000-0000-0000-0000-0000000000d1', 5, 'd1-bogus', 'bogus', 0,
      now() + interval '1 minute')$$,
  '23514', null, 'an unknown reservation status should be refused'
);
select throws_ok(
  $$insert into billing.reservations (
      user_id, amount, idempotency_key, available_after, expires_at)
    values ('00000000-0000-0000-0000-0000000000d1', 0, 'd1-zero', 0, now() + interval '1 minute')$$,
  '23514', null, 'a hold of 0 should be refused'
);
select throws_ok(
  $$insert into billing.reservations (
      user_id, amount, idempotency_key, status, available_after, expires_at, settle_amount)
    values ('00000000-0000-0000-0000-0000000000d1', 5, 'd1-pending-settled', 'pending', 0,
      now() + interval '1 minute', 3)$$,
  '23514', null, 'a pending hold with a settle_amount should be refused'
);

-- Ledger: clawback_reversed is a credit.
-- The sign is the writers' rule; check_invariants reports an entry that breaks it. The block
-- raises TBSEE once check_invariants reports the entry, which undoes the insert.
select throws_ok(
  $test$do $block$ begin
    insert into billing.ledger_entries (user_id, amount, balance_after, kind, idempotency_key)
    values ('00000000-0000-0000-0000-0000000000d1', -5, -5, 'clawback_reversed', 'd1-cr-neg');
    if exists (
      select 1 from billing.check_invariants() as i
      where i.problem like 'entry % clawback_reversed -5 has the wrong sign%'
    ) then
      raise exception using errcode = 'TBSEE', message = 'reported';
    end if;
  end $block$$test$,
  'TBSEE', 'reported', 'check_invariants should report a negative clawback_reversed entry'
);
select lives_ok(
  $$select * from billing.credit('00000000-0000-0000-0000-0000000000d1', 5,
      'stripe:clawback_reversed:re_d1', 'clawback_reversed', null, null,
      '{"stripe_event_id": "evt_d1"}')$$,
  'a clawback_reversed credit in the stripe: namespace should be written'
);
select tests.invariants_hold('check_invariants should know clawback_reversed and its key');

-- Credit buckets: no foreign keys on the hot path (20261202900400_hot_path_references.sql); a
-- bucket must hold a credit entry of its own user, which check_invariants reports otherwise.
select throws_ok(
  $test$do $block$ begin
    insert into billing.credit_buckets (user_id, entry_id, amount, remaining)
    values ('00000000-0000-0000-0000-0000000000d1', -1, 5, 0);
    if exists (
      select 1 from billing.check_invariants() as i
      where i.problem = format('bucket %s: entry -1 is not a ledger entry of its user',
        (select max(b.id) from billing.credit_buckets as b))
    ) then
      raise exception using errcode = 'TBSEE', message = 'reported';
    end if;
  end $block$$test$,
  'TBSEE', 'reported', 'check_invariants should report a bucket without its entry'
);
select throws_ok(
  $test$do $block$ begin
    with entry as (
      insert into billing.ledger_entries (user_id, amount, balance_after, kind, idempotency_key)
      values ('00000000-0000-0000-0000-0000000000d1', 5, 0, 'promotion', 'd1-bucket-elsewhere')
      returning id
    )
    insert into billing.credit_buckets (user_id, entry_id, amount, remaining)
    select '00000000-0000-0000-0000-0000000000d2', entry.id, 5, 0
    from entry;
    if exists (
      select 1 from billing.check_invariants() as i
      where i.problem like 'bucket %: entry % is not a ledger entry of its user'
        and i.user_id = '00000000-0000-0000-0000-0000000000d2'
    ) then
      raise exception using errcode = 'TBSEE', message = 'reported';
    end if;
  end $block$$test$,
  'TBSEE', 'reported', 'check_invariants should report a bucket of another user''s entry'
);
select throws_ok(
  $test$do $block$ begin
    insert into billing.creator_earnings (creator_id, kind, amount_microcents, idempotency_key)
    values ('00000000-0000-0000-0000-0000000000d3', 'usage_share', 5, 'd3-not-a-creator');
    if exists (
      select 1 from billing.check_invariants() as i
      where i.problem like 'creator earnings entry %: 00000000-0000-0000-0000-0000000000d3 is not a creator'
    ) then
      raise exception using errcode = 'TBSEE', message = 'reported';
    end if;
  end $block$$test$,
  'TBSEE', 'reported', 'check_invariants should report earnings of someone who is not a creator'
);
select tests.invariants_hold('the credits above should leave every bucket on its own entry');

select * from finish();
rollback;
