-- Accounts open themselves: every new auth.users row gets an account and the signup grant.
begin;
set local search_path = extensions, public;
select plan(17);

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

-- The grant is a setting (billing.settings), not an edit of a migration; 0 grants nothing.
update billing.settings set signup_grant = 250;
insert into auth.users (id, email) values ('00000000-0000-0000-0000-000000000a02', 'more@example.com');
select is(
  tests.balance('00000000-0000-0000-0000-000000000a02'), 250::bigint,
  'the grant should follow billing.settings.signup_grant'
);

update billing.settings set signup_grant = 0;
insert into auth.users (id, email) values ('00000000-0000-0000-0000-000000000a03', 'none@example.com');
select results_eq(
  $$select a.balance, (select count(*) from billing.ledger_entries as e where e.user_id = a.user_id)
    from billing.accounts as a where a.user_id = '00000000-0000-0000-0000-000000000a03'$$,
  $$values (0::bigint, 0::bigint)$$,
  'a signup grant of 0 should open the account without a grant'
);
select throws_ok(
  $$update billing.settings set signup_grant = -1$$,
  '23514', null,
  'a negative signup grant should be refused'
);
select throws_ok(
  $$insert into billing.settings (id, signup_grant, grant_existing_users, grant_anonymous_users)
    values (false, 1, false, false)$$,
  '23514', null,
  'billing.settings should hold one row only'
);

-- Anonymous sign-ins get no grant by default: anyone with the anon key can make such users.
update billing.settings set signup_grant = 100;
insert into auth.users (id, is_anonymous)
values ('00000000-0000-0000-0000-000000000a04', true);
select results_eq(
  $$select a.balance, (select count(*) from billing.ledger_entries as e where e.user_id = a.user_id)
    from billing.accounts as a where a.user_id = '00000000-0000-0000-0000-000000000a04'$$,
  $$values (0::bigint, 0::bigint)$$,
  'an anonymous user should get an account but no signup grant'
);

-- Linking an email ends the anonymity: the grant lands then, once.
update auth.users set email = 'linked@example.com', is_anonymous = false
where id = '00000000-0000-0000-0000-000000000a04';
select results_eq(
  $$select a.balance, (select count(*) from billing.ledger_entries as e where e.user_id = a.user_id)
    from billing.accounts as a where a.user_id = '00000000-0000-0000-0000-000000000a04'$$,
  $$values (100::bigint, 1::bigint)$$,
  'an anonymous user who links an email should get the signup grant then'
);
update auth.users set is_anonymous = true
where id = '00000000-0000-0000-0000-000000000a04';
update auth.users set is_anonymous = false
where id = '00000000-0000-0000-0000-000000000a04';
update auth.users set phone = '+15550100'
where id = '00000000-0000-0000-0000-000000000a04';
select results_eq(
  $$select count(*) from billing.ledger_entries
    where user_id = '00000000-0000-0000-0000-000000000a04' and kind = 'signup'$$,
  $$values (1::bigint)$$,
  'the grant should land once, however often the user row changes'
);

-- A changed grant does not disturb a user who already has one: linking never fails a sign-in.
update billing.settings set signup_grant = 300;
update auth.users set is_anonymous = true
where id = '00000000-0000-0000-0000-000000000a04';
select lives_ok(
  $$update auth.users set is_anonymous = false where id = '00000000-0000-0000-0000-000000000a04'$$,
  'linking again after the grant changed should neither fail nor grant again'
);
select results_eq(
  $$select balance from billing.accounts where user_id = '00000000-0000-0000-0000-000000000a04'$$,
  $$values (100::bigint)$$,
  'the first grant should stand'
);

-- With grant_anonymous_users on, anonymous users get it at signup.
update billing.settings set signup_grant = 100, grant_anonymous_users = true;
insert into auth.users (id, is_anonymous)
values ('00000000-0000-0000-0000-000000000a05', true);
select results_eq(
  $$select balance from billing.accounts where user_id = '00000000-0000-0000-0000-000000000a05'$$,
  $$values (100::bigint)$$,
  'with grant_anonymous_users on, an anonymous user should get the grant at signup'
);
update auth.users set is_anonymous = false
where id = '00000000-0000-0000-0000-000000000a05';
select results_eq(
  $$select count(*) from billing.ledger_entries where user_id = '00000000-0000-0000-0000-000000000a05'$$,
  $$values (1::bigint)$$,
  'and linking later should not grant a second time'
);

select tests.invariants_hold('the invariants should hold after signups');

select * from finish();
rollback;
