-- Accounts open themselves: every new auth.users row gets an account and the signup grant.
begin;
set local search_path = extensions, public;
select plan(8);

insert into auth.users (id, email) values ('00000000-0000-0000-0000-000000000a01', 'new@example.com');

select results_eq(
  $$select balance, reserved, plan, subscription_status from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000a01'$$,
  $$values (100::bigint, 0::bigint, 'free'::text, 'none'::text)$$,
  'a new user should get an account on the free plan with its 100 tokens'
);
select results_eq(
  $$select kind, amount, idempotency_key from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000a01'$$,
  $$values ('signup'::text, 100::bigint, 'signup:00000000-0000-0000-0000-000000000a01'::text)$$,
  'the signup grant should land as an ordinary ledger entry'
);
select is(
  (
    select expires_at from billing.credit_buckets
    where user_id = '00000000-0000-0000-0000-000000000a01'
  ),
  null, 'the signup grant should never expire'
);

select lives_ok(
  $$select billing.open_account('00000000-0000-0000-0000-000000000a01')$$,
  'opening an existing account again should be harmless'
);
select is(
  (
    select count(*)::int from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000a01'
  ),
  1, 'the signup grant should be credited once'
);

-- The grant is the free plan's tokens: configurable.
update billing.products set tokens = 250
where code = 'free';
insert into auth.users (id, email) values ('00000000-0000-0000-0000-000000000a02', 'more@example.com');
select is(
  tests.balance('00000000-0000-0000-0000-000000000a02'), 250::bigint,
  'the grant should follow the free plan''s tokens'
);

update billing.products set tokens = 0
where code = 'free';
insert into auth.users (id, email) values ('00000000-0000-0000-0000-000000000a03', 'none@example.com');
select results_eq(
  $$select a.balance, (select count(*) from billing.ledger_entries as e where e.user_id = a.user_id)
    from billing.accounts as a where a.user_id = '00000000-0000-0000-0000-000000000a03'$$,
  $$values (0::bigint, 0::bigint)$$,
  'a free plan of 0 tokens should open the account without a grant'
);

select tests.invariants_hold('the invariants should hold after signups');

select * from finish();
rollback;
