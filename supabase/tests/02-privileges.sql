-- The privilege matrix: every function and table against anon, authenticated (as the owner of
-- the row and as another user) and service_role. Privileges before behaviour.
begin;
set local search_path = extensions, public;
select plan(115);

-- Two users: A owns the rows under test, B is another signed-in user.
select tests.create_user('00000000-0000-0000-0000-00000000000a', 'a@example.com');
select tests.create_user('00000000-0000-0000-0000-00000000000b', 'b@example.com');

-- The trap is real here: a function a migration creates in public is executable by anon unless
-- revoked (Supabase's default privileges, reproduced by tests/sql/supabase_compat.sql).
set local role postgres;
create function public.tutorial_mint() returns int language sql as 'select 1';
reset role;
select ok(
  has_function_privilege('anon', 'public.tutorial_mint()', 'execute'),
  'a new function in public should be executable by anon by default (the trap is reproduced)'
);

-- Functions: catalog-wide rules, so a function added later cannot slip through.
select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace
    where n.nspname = 'public' and p.proowner = 'postgres'::regrole
      and p.proname <> 'tutorial_mint'
      and has_function_privilege('anon', p.oid, 'execute')
  $$,
  'no token-billing function in public should be executable by anon'
);
select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace
    where n.nspname = 'public' and p.proowner = 'postgres'::regrole
      and p.proname not in (
        'tutorial_mint', 'my_tokens', 'my_usage', 'my_entitlements',
        -- The marketplace's (issue 19; supabase/tests/50-marketplace-privileges.sql).
        'my_creator', 'my_agents', 'my_creator_earnings', 'my_creator_payouts'
      )
      and has_function_privilege('authenticated', p.oid, 'execute')
  $$,
  'no token-billing function in public but the my_* ones should be executable by authenticated'
);
select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace
    where n.nspname = 'public' and p.proowner = 'postgres'::regrole
      and p.proname not in (
        'tutorial_mint', 'my_tokens', 'my_usage', 'my_entitlements',
        -- The marketplace's (issue 19; supabase/tests/50-marketplace-privileges.sql).
        'my_creator', 'my_agents', 'my_creator_earnings', 'my_creator_payouts'
      )
      and not has_function_privilege('service_role', p.oid, 'execute')
  $$,
  'every token-billing RPC should be executable by service_role'
);
select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p
    join pg_namespace as n on n.oid = p.pronamespace
    cross join lateral aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) as acl
    where (n.nspname = 'billing'
        or (n.nspname = 'public' and p.proowner = 'postgres'::regrole
          and p.proname <> 'tutorial_mint'))
      and acl.grantee = 0 and acl.privilege_type = 'EXECUTE'
  $$,
  'no token-billing function should be executable by PUBLIC'
);
select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace
    where n.nspname in ('public', 'billing') and p.prosecdef
      and p.proname <> 'tutorial_mint'
      and (has_function_privilege('anon', p.oid, 'execute')
        or has_function_privilege('authenticated', p.oid, 'execute'))
  $$,
  'no security definer function should be executable by anon or authenticated (splinter 0028/0029)'
);
select is_empty(
  $$
    select p.oid::regprocedure::text || ' by ' || r.rolname
    from pg_proc as p
    join pg_namespace as n on n.oid = p.pronamespace
    cross join (values ('anon'), ('authenticated'), ('service_role')) as r (rolname)
    where n.nspname = 'billing' and has_function_privilege(r.rolname, p.oid, 'execute')
  $$,
  'private billing functions should be executable by none of the API roles'
);

select function_privs_are(
  'public', 'add_tokens',
  array['uuid', 'bigint', 'text', 'text', 'text', 'timestamp with time zone', 'jsonb'],
  'service_role', array['EXECUTE'], 'service_role should execute add_tokens'
);
select function_privs_are(
  'public', 'add_tokens',
  array['uuid', 'bigint', 'text', 'text', 'text', 'timestamp with time zone', 'jsonb'],
  'anon', array[]::text[], 'anon should not execute add_tokens'
);
select function_privs_are(
  'public', 'add_tokens',
  array['uuid', 'bigint', 'text', 'text', 'text', 'timestamp with time zone', 'jsonb'],
  'authenticated', array[]::text[], 'authenticated should not execute add_tokens'
);
select function_privs_are(
  'public', 'deduct_tokens', array['uuid', 'bigint', 'text', 'text', 'jsonb'],
  'authenticated', array[]::text[], 'authenticated should not execute deduct_tokens'
);
select function_privs_are(
  'public', 'reserve_tokens', array['uuid', 'bigint', 'text', 'interval'],
  'authenticated', array[]::text[], 'authenticated should not execute reserve_tokens'
);
select function_privs_are(
  'public', 'settle_reservation', array['uuid', 'bigint'],
  'authenticated', array[]::text[], 'authenticated should not execute settle_reservation'
);
select function_privs_are(
  'public', 'release_reservation', array['uuid'],
  'authenticated', array[]::text[], 'authenticated should not execute release_reservation'
);
select function_privs_are(
  'public', 'expire_tokens', array['timestamp with time zone'],
  'authenticated', array[]::text[], 'authenticated should not execute expire_tokens'
);
select function_privs_are(
  'public', 'settle_reservations', array['jsonb'],
  'anon', array[]::text[], 'anon should not execute settle_reservations'
);
select function_privs_are(
  'public', 'settle_reservations', array['jsonb'],
  'authenticated', array[]::text[], 'authenticated should not execute settle_reservations'
);
select function_privs_are(
  'public', 'settle_reservations', array['jsonb'],
  'service_role', array['EXECUTE'], 'service_role should execute settle_reservations'
);
select function_privs_are(
  'public', 'deduct_tokens_batch', array['jsonb'],
  'anon', array[]::text[], 'anon should not execute deduct_tokens_batch'
);
select function_privs_are(
  'public', 'deduct_tokens_batch', array['jsonb'],
  'authenticated', array[]::text[], 'authenticated should not execute deduct_tokens_batch'
);
select function_privs_are(
  'public', 'deduct_tokens_batch', array['jsonb'],
  'service_role', array['EXECUTE'], 'service_role should execute deduct_tokens_batch'
);
select function_privs_are(
  'public', 'extend_reservation', array['uuid', 'interval'],
  'anon', array[]::text[], 'anon should not execute extend_reservation'
);
select function_privs_are(
  'public', 'extend_reservation', array['uuid', 'interval'],
  'authenticated', array[]::text[], 'authenticated should not execute extend_reservation'
);
select function_privs_are(
  'public', 'extend_reservation', array['uuid', 'interval'],
  'service_role', array['EXECUTE'], 'service_role should execute extend_reservation'
);
select function_privs_are(
  'public', 'get_reservation', array['uuid'],
  'anon', array[]::text[], 'anon should not execute get_reservation'
);
select function_privs_are(
  'public', 'get_reservation', array['uuid'],
  'authenticated', array[]::text[], 'authenticated should not execute get_reservation'
);
select function_privs_are(
  'public', 'get_reservation', array['uuid'],
  'service_role', array['EXECUTE'], 'service_role should execute get_reservation'
);
select function_privs_are(
  'public', 'my_tokens', array[]::text[],
  'authenticated', array['EXECUTE'], 'authenticated should execute my_tokens'
);
select function_privs_are(
  'public', 'my_tokens', array[]::text[],
  'anon', array[]::text[], 'anon should not execute my_tokens'
);

-- Tables: anon gets nothing, authenticated and service_role only read.
select is_empty(
  $$
    select c.relname || ' ' || r.rolname || ' ' || p.privilege
    from pg_class as c
    join pg_namespace as n on n.oid = c.relnamespace
    cross join (values ('anon'), ('authenticated'), ('service_role')) as r (rolname)
    cross join (values ('INSERT'), ('UPDATE'), ('DELETE'), ('TRUNCATE'), ('REFERENCES'),
      ('TRIGGER')) as p (privilege)
    where n.nspname = 'billing' and c.relkind in ('r', 'p')
      and has_table_privilege(r.rolname, c.oid, p.privilege)
  $$,
  'no API role should have any write privilege on any billing table'
);
select is_empty(
  $$
    select c.relname
    from pg_class as c join pg_namespace as n on n.oid = c.relnamespace
    where n.nspname = 'billing' and c.relkind in ('r', 'p', 'v', 'm')
      and has_table_privilege('anon', c.oid, 'SELECT')
  $$,
  'anon should read no billing table'
);
select ok(
  not has_schema_privilege('anon', 'billing', 'USAGE'),
  'anon should not even reach the billing schema'
);
select table_privs_are(
  'billing', 'accounts', 'authenticated', array['SELECT'],
  'authenticated should only select billing.accounts (through RLS)'
);
select table_privs_are(
  'billing', 'ledger_entries', 'authenticated', array['SELECT'],
  'authenticated should only select billing.ledger_entries (through RLS)'
);
select table_privs_are(
  'billing', 'credit_buckets', 'authenticated', array['SELECT'],
  'authenticated should only select billing.credit_buckets (through RLS)'
);
select table_privs_are(
  'billing', 'reservations', 'authenticated', array['SELECT'],
  'authenticated should only select billing.reservations (through RLS)'
);
select table_privs_are(
  'billing', 'accounts', 'service_role', array['SELECT'],
  'service_role should only select billing.accounts'
);
select table_privs_are(
  'billing', 'ledger_entries', 'service_role', array['SELECT'],
  'service_role should only select billing.ledger_entries'
);
select table_privs_are(
  'billing', 'stripe_sales', 'service_role', array['SELECT'],
  'service_role should only select billing.stripe_sales (the recording RPCs write it)'
);
select table_privs_are(
  'billing', 'stripe_invoice_payments', 'service_role', array['SELECT'],
  'service_role should only select billing.stripe_invoice_payments'
);
select table_privs_are(
  'billing', 'stripe_sales', 'authenticated', array[]::text[],
  'authenticated should have no privilege on billing.stripe_sales'
);

select table_privs_are(
  'billing', 'subscription_statuses', 'authenticated', array[]::text[],
  'authenticated should not reach billing.subscription_statuses'
);
select table_privs_are(
  'billing', 'subscription_statuses', 'service_role', array['SELECT'],
  'service_role should only select billing.subscription_statuses'
);

-- Behaviour as anon --------------------------------------------------------------------------
set local role anon;
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000a', 1000, 'anon-mint')$$,
  '42501', null, 'anon should not mint tokens through add_tokens'
);
select throws_ok(
  $$select * from public.deduct_tokens('00000000-0000-0000-0000-00000000000a', 1, 'anon-burn')$$,
  '42501', null, 'anon should not deduct tokens'
);
select throws_ok(
  $$
    select * from public.deduct_tokens_batch(
      '[{"user_id": "00000000-0000-0000-0000-00000000000a", "amount": 1,
        "idempotency_key": "anon-batch"}]'
    )
  $$,
  '42501', null, 'anon should not deduct tokens in a batch'
);
select throws_ok(
  $$select * from public.reserve_tokens('00000000-0000-0000-0000-00000000000a', 1, 'anon-hold')$$,
  '42501', null, 'anon should not reserve tokens'
);
select throws_ok(
  $$select * from public.expire_tokens()$$,
  '42501', null, 'anon should not run expiry'
);
select throws_ok(
  $$select * from public.my_tokens()$$,
  '42501', null, 'anon should not call my_tokens'
);
select throws_ok(
  $$select * from public.record_checkout_session('{"object": "checkout.session"}')$$,
  '42501', null, 'anon should not record a checkout session (a sale credits tokens)'
);
select throws_ok(
  $$select * from public.record_payment_intent('{"object": "payment_intent"}')$$,
  '42501', null, 'anon should not record a payment intent'
);
select throws_ok(
  $$select * from billing.accounts$$,
  '42501', null, 'anon should not read billing.accounts'
);
select throws_ok(
  $$select * from billing.credit('00000000-0000-0000-0000-00000000000a', 5, 'x', 'purchase')$$,
  '42501', null, 'anon should not call the private credit primitive'
);
reset role;

-- Behaviour as authenticated user A (the owner) ------------------------------------------------
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-00000000000a", "role": "authenticated"}', true
);
set local role authenticated;
select results_eq(
  $$select balance, available, reserved, plan from public.my_tokens()$$,
  $$values (100::bigint, 100::bigint, 0::bigint, 'free'::text)$$,
  'my_tokens should return the owner''s own balance'
);
select results_eq(
  $$select user_id from billing.accounts$$,
  $$values ('00000000-0000-0000-0000-00000000000a'::uuid)$$,
  'the owner should see exactly the own account row'
);
select results_eq(
  $$select count(*)::int from billing.ledger_entries$$, $$values (1)$$,
  'the owner should see only the own ledger entries'
);
select throws_ok(
  $$select * from public.add_tokens('00000000-0000-0000-0000-00000000000a', 1000, 'self-mint')$$,
  '42501', null, 'a signed-in user should not mint tokens for themselves'
);
select throws_ok(
  $$select * from public.deduct_tokens('00000000-0000-0000-0000-00000000000b', 50, 'grief')$$,
  '42501', null, 'a signed-in user should not deduct another user''s tokens'
);
select throws_ok(
  $$update billing.accounts set balance = 1000000$$,
  '42501', null, 'the owner should not update the own balance directly'
);
select throws_ok(
  $$insert into billing.accounts (user_id, balance) values (gen_random_uuid(), 10)$$,
  '42501', null, 'a signed-in user should not insert accounts'
);
select throws_ok(
  $$insert into billing.ledger_entries (user_id, amount, balance_after, kind, idempotency_key)
    values ('00000000-0000-0000-0000-00000000000a', 500, 600, 'purchase', 'forged')$$,
  '42501', null, 'a signed-in user should not insert ledger entries'
);
select throws_ok(
  $$delete from billing.ledger_entries$$,
  '42501', null, 'a signed-in user should not delete ledger entries'
);
select throws_ok(
  $$update billing.credit_buckets set remaining = amount + 1000$$,
  '42501', null, 'a signed-in user should not refill buckets'
);
select throws_ok(
  $$update billing.products set tokens = 1000000$$,
  '42501', null, 'a signed-in user should not change the catalog'
);
select throws_ok(
  $$select * from billing.credit('00000000-0000-0000-0000-00000000000a', 5, 'x', 'purchase')$$,
  '42501', null, 'a signed-in user should not call the private credit primitive'
);
reset role;

-- As another signed-in user B ------------------------------------------------------------------
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-00000000000b", "role": "authenticated"}', true
);
set local role authenticated;
select is_empty(
  $$select 1 from billing.accounts where user_id = '00000000-0000-0000-0000-00000000000a'$$,
  'another user should not see the owner''s account'
);
select is_empty(
  $$select 1 from billing.ledger_entries where user_id = '00000000-0000-0000-0000-00000000000a'$$,
  'another user should not see the owner''s ledger entries'
);
select is_empty(
  $$select 1 from billing.credit_buckets where user_id = '00000000-0000-0000-0000-00000000000a'$$,
  'another user should not see the owner''s buckets'
);
select results_eq(
  $$select count(*)::int from public.my_tokens()$$, $$values (1)$$,
  'my_tokens should return only the caller''s row'
);
select is(
  (select count(*)::int from billing.accounts), 1,
  'another user should see exactly one account: their own'
);
reset role;

-- Without claims, authenticated sees nothing.
select set_config('request.jwt.claims', '', true);
set local role authenticated;
select is_empty(
  $$select * from public.my_tokens()$$,
  'authenticated without a subject should get no balance'
);
select is_empty(
  $$select * from billing.accounts$$,
  'authenticated without a subject should see no account'
);
reset role;

-- As service_role -------------------------------------------------------------------------------
set local role service_role;
select results_eq(
  $$select status from public.add_tokens('00000000-0000-0000-0000-00000000000a', 10, 'svc-1')$$,
  $$values ('applied'::text)$$,
  'service_role should credit through add_tokens'
);
select results_eq(
  $$select status from public.deduct_tokens('00000000-0000-0000-0000-00000000000a', 5, 'svc-2')$$,
  $$values ('applied'::text)$$,
  'service_role should deduct through deduct_tokens'
);
select throws_ok(
  $$update billing.accounts set balance = 0$$,
  '42501', null, 'service_role should not write balances directly'
);
select throws_ok(
  $$insert into billing.ledger_entries (user_id, amount, balance_after, kind, idempotency_key)
    values ('00000000-0000-0000-0000-00000000000a', 5, 5, 'purchase', 'svc-forged')$$,
  '42501', null, 'service_role should not insert ledger entries directly'
);
select throws_ok(
  $$delete from billing.ledger_entries$$,
  '42501', null, 'service_role should not delete ledger entries'
);
select throws_ok(
  $$select * from billing.debit('00000000-0000-0000-0000-00000000000a', 1, 'x', 'usage')$$,
  '42501', null, 'service_role should not call private primitives'
);
select is(
  (
    select count(*)::int from billing.accounts
    where user_id in ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-00000000000b')
  ),
  2,
  'service_role should read every user''s account (bypassrls)'
);
reset role;

-- The readiness check's read of the installed version (20261202300000_installed_migrations).
select function_privs_are(
  'public', 'installed_migrations', array[]::text[],
  'service_role', array['EXECUTE'], 'service_role should execute installed_migrations'
);
select function_privs_are(
  'public', 'installed_migrations', array[]::text[],
  'anon', array[]::text[], 'anon should not execute installed_migrations'
);
select function_privs_are(
  'public', 'installed_migrations', array[]::text[],
  'authenticated', array[]::text[], 'authenticated should not execute installed_migrations'
);

-- Margin, alerts, adjustments and the business metrics (20261202650100..650300): service_role only.
select function_privs_are(
  'public', 'margin_report', array['timestamp with time zone', 'timestamp with time zone', 'text', 'text', 'text'],
  'service_role', array['EXECUTE'], 'service_role should execute margin_report'
);
select function_privs_are(
  'public', 'margin_report', array['timestamp with time zone', 'timestamp with time zone', 'text', 'text', 'text'],
  'anon', array[]::text[], 'anon should not execute margin_report'
);
select function_privs_are(
  'public', 'margin_report', array['timestamp with time zone', 'timestamp with time zone', 'text', 'text', 'text'],
  'authenticated', array[]::text[], 'authenticated should not execute margin_report'
);
select function_privs_are(
  'public', 'check_margin_floor', array['timestamp with time zone', 'text'],
  'service_role', array['EXECUTE'], 'service_role should execute check_margin_floor'
);
select function_privs_are(
  'public', 'check_margin_floor', array['timestamp with time zone', 'text'],
  'anon', array[]::text[], 'anon should not execute check_margin_floor'
);
select function_privs_are(
  'public', 'check_margin_floor', array['timestamp with time zone', 'text'],
  'authenticated', array[]::text[], 'authenticated should not execute check_margin_floor'
);
select function_privs_are(
  'public', 'list_alerts', array['integer'],
  'service_role', array['EXECUTE'], 'service_role should execute list_alerts'
);
select function_privs_are(
  'public', 'list_alerts', array['integer'],
  'anon', array[]::text[], 'anon should not execute list_alerts'
);
select function_privs_are(
  'public', 'list_alerts', array['integer'],
  'authenticated', array[]::text[], 'authenticated should not execute list_alerts'
);
select function_privs_are(
  'public', 'adjust_tokens', array['uuid', 'bigint', 'text', 'text', 'boolean', 'text'],
  'service_role', array['EXECUTE'], 'service_role should execute adjust_tokens'
);
select function_privs_are(
  'public', 'adjust_tokens', array['uuid', 'bigint', 'text', 'text', 'boolean', 'text'],
  'anon', array[]::text[], 'anon should not execute adjust_tokens'
);
select function_privs_are(
  'public', 'adjust_tokens', array['uuid', 'bigint', 'text', 'text', 'boolean', 'text'],
  'authenticated', array[]::text[], 'authenticated should not execute adjust_tokens'
);
select function_privs_are(
  'public', 'business_metrics', array['interval'],
  'service_role', array['EXECUTE'], 'service_role should execute business_metrics'
);
select function_privs_are(
  'public', 'business_metrics', array['interval'],
  'anon', array[]::text[], 'anon should not execute business_metrics'
);
select function_privs_are(
  'public', 'business_metrics', array['interval'],
  'authenticated', array[]::text[], 'authenticated should not execute business_metrics'
);
select table_privs_are(
  'billing', 'alerts', 'service_role', array['SELECT'],
  'service_role should only read billing.alerts'
);
select table_privs_are(
  'billing', 'alerts', 'anon', array[]::text[],
  'anon should have no privilege on billing.alerts'
);
select table_privs_are(
  'billing', 'alerts', 'authenticated', array[]::text[],
  'authenticated should have no privilege on billing.alerts'
);
select table_privs_are(
  'billing', 'ledger_totals', 'service_role', array['SELECT'],
  'service_role should only read billing.ledger_totals'
);
select table_privs_are(
  'billing', 'ledger_totals', 'anon', array[]::text[],
  'anon should have no privilege on billing.ledger_totals'
);
select table_privs_are(
  'billing', 'ledger_totals', 'authenticated', array[]::text[],
  'authenticated should have no privilege on billing.ledger_totals'
);
select table_privs_are(
  'billing', 'metric_state', 'service_role', array['SELECT'],
  'service_role should only read billing.metric_state'
);
select table_privs_are(
  'billing', 'metric_state', 'anon', array[]::text[],
  'anon should have no privilege on billing.metric_state'
);
select table_privs_are(
  'billing', 'metric_state', 'authenticated', array[]::text[],
  'authenticated should have no privilege on billing.metric_state'
);

select table_privs_are(
  'billing', 'subscription_lifetimes', 'service_role', array['SELECT'],
  'service_role should only read billing.subscription_lifetimes'
);
select table_privs_are(
  'billing', 'subscription_lifetimes', 'anon', array[]::text[],
  'anon should have no privilege on billing.subscription_lifetimes'
);
select table_privs_are(
  'billing', 'subscription_lifetimes', 'authenticated', array[]::text[],
  'authenticated should have no privilege on billing.subscription_lifetimes'
);

-- Even the owner cannot edit the ledger: append-only for every role.
set local role postgres;
select throws_ok(
  $$update billing.ledger_entries set amount = 1000000$$,
  'TBAPP', null, 'the table owner should not update ledger entries'
);
select throws_ok(
  $$delete from billing.ledger_entries$$,
  'TBAPP', null, 'the table owner should not delete ledger entries'
);
select throws_ok(
  $$truncate billing.ledger_entries cascade$$,
  'TBAPP', null, 'the table owner should not truncate the ledger'
);
reset role;
select throws_ok(
  $$update billing.ledger_entries set amount = 1000000$$,
  'TBAPP', null, 'a superuser should not update ledger entries either'
);
select is(
  tests.balance('00000000-0000-0000-0000-00000000000a'), 105::bigint,
  'after every refused attempt the owner''s balance should be what the RPCs made it'
);
select tests.invariants_hold('the ledger invariants should hold after the whole matrix');

select * from finish();
rollback;
