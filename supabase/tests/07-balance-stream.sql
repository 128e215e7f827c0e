-- What the service's balance stream and ledger history read: the notify trigger (absent unless
-- turned on) and list_ledger_entries(). Shape, then privileges, then behaviour.
begin;
set local search_path = extensions, public;
select plan(22);

select tests.create_user('00000000-0000-0000-0000-000000000c01', 'c1@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000c02', 'c2@example.com');

-- Shape ---------------------------------------------------------------------------------------
select hasnt_trigger(
  'billing', 'accounts', 'tg_accounts__90_notify_balance',
  'the notify trigger should not exist until it is turned on (the hot path pays nothing)'
);
select is(
  billing.set_balance_notify(true), true,
  'set_balance_notify(true) should report notifications on'
);
select trigger_is(
  'billing', 'accounts', 'tg_accounts__90_notify_balance',
  'billing', 'tg_accounts__notify_balance',
  'turned on, billing.accounts should announce changes through the notify trigger'
);
select is(
  (
    select tgtype::int & 2
    from pg_trigger
    where tgname = 'tg_accounts__90_notify_balance'
  ),
  0,
  'the notify trigger should run after the change (never block or rewrite it)'
);
select lives_ok(
  $$select billing.set_balance_notify(true)$$,
  'turning notifications on twice should be harmless'
);
select is(
  billing.set_balance_notify(false), false,
  'set_balance_notify(false) should report notifications off'
);
select hasnt_trigger(
  'billing', 'accounts', 'tg_accounts__90_notify_balance',
  'turned off, the notify trigger should be gone'
);
select has_function(
  'public', 'list_ledger_entries', array['uuid', 'integer'],
  'public.list_ledger_entries should exist'
);
select isnt_definer(
  'public', 'list_ledger_entries', array['uuid', 'integer'],
  'list_ledger_entries should be security invoker'
);

-- Privileges ----------------------------------------------------------------------------------
select function_privs_are(
  'public', 'list_ledger_entries', array['uuid', 'integer'],
  'service_role', array['EXECUTE'], 'service_role should execute list_ledger_entries'
);
select function_privs_are(
  'public', 'list_ledger_entries', array['uuid', 'integer'],
  'authenticated', array[]::text[], 'authenticated should not execute list_ledger_entries'
);
select function_privs_are(
  'public', 'list_ledger_entries', array['uuid', 'integer'],
  'anon', array[]::text[], 'anon should not execute list_ledger_entries'
);
select function_privs_are(
  'billing', 'set_balance_notify', array['boolean'],
  'service_role', array[]::text[], 'service_role should not turn notifications on or off'
);
select function_privs_are(
  'billing', 'tg_accounts__notify_balance', array[]::text[],
  'service_role', array[]::text[], 'service_role should not call the trigger function'
);

-- Behaviour -----------------------------------------------------------------------------------
set local role service_role;
select is(
  (select status from public.add_tokens('00000000-0000-0000-0000-000000000c01', 50, 'c-1', 'purchase', 'pack')),
  'applied', 'a purchase should apply'
);
select is(
  (select status from public.deduct_tokens('00000000-0000-0000-0000-000000000c01', 20, 'c-2', 'a chat')),
  'applied', 'a deduction should apply'
);
select is(
  (select status from public.add_tokens('00000000-0000-0000-0000-000000000c02', 7, 'c-3', 'promotion')),
  'applied', 'another user''s credit should apply'
);

select results_eq(
  $$select amount, balance_after, kind, description
    from public.list_ledger_entries('00000000-0000-0000-0000-000000000c01')$$,
  $$values (-20::bigint, 130::bigint, 'usage'::text, 'a chat'::text),
    (50::bigint, 150::bigint, 'purchase'::text, 'pack'::text),
    (100::bigint, 100::bigint, 'signup'::text, 'Signup grant'::text)$$,
  'list_ledger_entries should return the user''s entries newest first, nobody else''s'
);
select results_eq(
  $$select amount from public.list_ledger_entries('00000000-0000-0000-0000-000000000c01', 1)$$,
  $$values (-20::bigint)$$,
  'list_ledger_entries should return at most p_limit entries'
);
select is_empty(
  $$select * from public.list_ledger_entries('00000000-0000-0000-0000-000000000c09')$$,
  'list_ledger_entries should return nothing for a user without entries'
);
select throws_ok(
  $$select * from public.list_ledger_entries('00000000-0000-0000-0000-000000000c01', 101)$$,
  '22023', 'p_limit must be between 1 and 100, got 101',
  'a limit above 100 should be refused with 22023'
);
select throws_ok(
  $$select * from public.list_ledger_entries(null)$$,
  '22023', 'p_user_id must not be null',
  'a null user should be refused with 22023'
);
reset role;

select * from finish();
rollback;
