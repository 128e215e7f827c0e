-- The privilege matrix of the marketplace (issue 19): every new function and table against anon,
-- authenticated (the owner and another user) and service_role; then the rules the tables keep
-- (append-only earnings, listings only with charges_enabled, the exact fee).
begin;
set local search_path = extensions, public;
select plan(29);

-- A creator (C) with an agent and earnings, and another user (U).
select tests.create_user('00000000-0000-0000-0000-0000000000c5', 'c5@example.com');
select tests.create_user('00000000-0000-0000-0000-0000000000d5', 'd5@example.com');
select status from public.register_creator('00000000-0000-0000-0000-0000000000c5', 'acct_1Priv');
update billing.creators set charges_enabled = true, payouts_enabled = true
where user_id = '00000000-0000-0000-0000-0000000000c5';
select status from public.upsert_listing(
    '00000000-0000-0000-0000-0000000000c5', 'agent_priv', 'Priv', 1999, 5
  );
select status from public.deduct_tokens(
    '00000000-0000-0000-0000-0000000000d5', 5, 'priv-run', 'run', '{"listing": "agent_priv"}'
  );

-- Functions ---------------------------------------------------------------------------------------
select is_empty(
  $$
    select f.signature || ' ' || r.rolname
    from (values
      ('public.register_creator(uuid, text)'),
      ('public.get_creator(uuid)'),
      ('public.upsert_listing(uuid, text, text, integer, bigint, text, text, boolean)'),
      ('public.list_listings(text)'),
      ('public.quote_listing_sale(uuid, text)'),
      ('public.record_marketplace_checkout(jsonb, bigint, text)'),
      ('public.get_marketplace_sale(text)'),
      ('public.creator_statement(uuid, timestamptz)'),
      ('public.begin_creator_payouts(date, timestamptz, boolean)'),
      ('public.complete_creator_payout(uuid, jsonb)'),
      ('public.fail_creator_payout(uuid, text)'),
      ('public.list_creator_payouts(uuid)')
    ) as f (signature)
    cross join (values ('anon'), ('authenticated')) as r (rolname)
    where has_function_privilege(r.rolname, f.signature::regprocedure, 'execute')
  $$,
  'no marketplace RPC should be executable by anon or authenticated'
);
select ok(
  (
    select bool_and(has_function_privilege('service_role', f.signature::regprocedure, 'execute'))
    from (
      values
      ('public.register_creator(uuid, text)'),
      ('public.get_creator(uuid)'),
      ('public.upsert_listing(uuid, text, text, integer, bigint, text, text, boolean)'),
      ('public.list_listings(text)'),
      ('public.quote_listing_sale(uuid, text)'),
      ('public.record_marketplace_checkout(jsonb, bigint, text)'),
      ('public.get_marketplace_sale(text)'),
      ('public.creator_statement(uuid, timestamptz)'),
      ('public.begin_creator_payouts(date, timestamptz, boolean)'),
      ('public.complete_creator_payout(uuid, jsonb)'),
      ('public.fail_creator_payout(uuid, text)'),
      ('public.list_creator_payouts(uuid)')
    ) as f (signature)
  ),
  'service_role should execute every marketplace RPC'
);
select is_empty(
  $$
    select f.signature
    from (values
      ('public.my_creator()'), ('public.my_agents()'), ('public.my_creator_earnings(integer)'),
      ('public.my_creator_payouts()')
    ) as f (signature)
    where has_function_privilege('anon', f.signature::regprocedure, 'execute')
  $$,
  'the my_* marketplace functions should not be executable by anon'
);
select ok(
  (
    select bool_and(has_function_privilege('authenticated', f.signature::regprocedure, 'execute'))
    from (
      values
      ('public.my_creator()'), ('public.my_agents()'), ('public.my_creator_earnings(integer)'),
      ('public.my_creator_payouts()')
    ) as f (signature)
  ),
  'authenticated should execute the my_* marketplace functions'
);
select is_empty(
  $$
    select p.oid::regprocedure::text from pg_proc as p
    where p.oid in (
      'public.my_creator()'::regprocedure, 'public.my_agents()'::regprocedure,
      'public.my_creator_earnings(integer)'::regprocedure, 'public.my_creator_payouts()'::regprocedure
    ) and p.prosecdef
  $$,
  'the my_* marketplace functions should be security invoker (they read through RLS)'
);

-- Tables -----------------------------------------------------------------------------------------
select table_privs_are(
  'billing', 'creators', 'authenticated', array['SELECT'], 'authenticated should only read creators (RLS)'
);
select table_privs_are(
  'billing', 'entitlements', 'authenticated', array['SELECT'],
  'authenticated should only read entitlements (RLS)'
);
select table_privs_are(
  'billing', 'creator_earnings', 'authenticated', array['SELECT'],
  'authenticated should only read creator earnings (RLS)'
);
select table_privs_are(
  'billing', 'creator_payouts', 'authenticated', array['SELECT'],
  'authenticated should only read creator payouts (RLS)'
);
select is_empty(
  $$
    select t.name || ' ' || r.rolname
    from (values ('marketplace_sales'), ('marketplace_refunds'), ('marketplace_disputes')) as t (name)
    cross join (values ('anon'), ('authenticated')) as r (rolname)
    where has_table_privilege(r.rolname, ('billing.' || t.name)::regclass, 'SELECT')
  $$,
  'sales, refunds and disputes should be service_role only'
);
select ok(
  (
    select
      bool_and(
        has_table_privilege('service_role', ('billing.' || t.name)::regclass, 'SELECT')
        and not has_table_privilege('service_role', ('billing.' || t.name)::regclass, 'INSERT')
        and not has_table_privilege('service_role', ('billing.' || t.name)::regclass, 'UPDATE')
      )
    from (
      values
      ('creators'), ('entitlements'), ('creator_earnings'), ('creator_payouts'),
      ('marketplace_sales'), ('marketplace_refunds'), ('marketplace_disputes')
    ) as t (name)
  ),
  'service_role should only read the marketplace tables (the functions write them)'
);
select is_empty(
  $$
    select c.relname from pg_class as c
    where c.oid in (
      'billing.creators'::regclass, 'billing.entitlements'::regclass,
      'billing.creator_earnings'::regclass, 'billing.creator_payouts'::regclass,
      'billing.marketplace_sales'::regclass, 'billing.marketplace_refunds'::regclass,
      'billing.marketplace_disputes'::regclass
    ) and not c.relrowsecurity
  $$,
  'every marketplace table should have RLS enabled'
);

-- As anon ----------------------------------------------------------------------------------------
set local role anon;
select throws_ok(
  $$select * from public.register_creator('00000000-0000-0000-0000-0000000000d5', 'acct_1Anon')$$,
  '42501', null, 'anon should not register a creator'
);
select throws_ok(
  $$select * from public.my_creator_earnings()$$, '42501', null, 'anon should not read earnings'
);
reset role;

-- As the creator C ---------------------------------------------------------------------------------
select set_config(
  'request.jwt.claims', '{"sub": "00000000-0000-0000-0000-0000000000c5", "role": "authenticated"}', true
);
set local role authenticated;
select results_eq(
  $$select stripe_account_id, charges_enabled from public.my_creator()$$,
  $$values ('acct_1Priv'::text, true)$$,
  'my_creator should show the creator its own account'
);
select results_eq(
  $$select kind, amount_microcents, tokens from public.my_creator_earnings()$$,
  -- floor(5 x 3333333 x 8000 / 10000) = floor(13333332) = 13333332
  $$values ('usage_share'::text, 13333332::bigint, 5::bigint)$$,
  'my_creator_earnings should show the creator its share of the run, exactly'
);
select throws_ok(
  $$select * from public.upsert_listing('00000000-0000-0000-0000-0000000000c5', 'agent_self', 'x', 100)$$,
  '42501', null, 'a creator should not call upsert_listing directly (the service does)'
);
select throws_ok(
  $$insert into billing.creator_earnings (creator_id, kind, amount_microcents, idempotency_key)
    values ('00000000-0000-0000-0000-0000000000c5', 'usage_share', 1000000000, 'forged')$$,
  '42501', null, 'a creator should not write earnings'
);
select throws_ok(
  $$update billing.creators set commission_bps = 0$$,
  '42501', null, 'a creator should not change its own commission'
);
reset role;

-- As another user U ------------------------------------------------------------------------------------
select set_config(
  'request.jwt.claims', '{"sub": "00000000-0000-0000-0000-0000000000d5", "role": "authenticated"}', true
);
set local role authenticated;
select is_empty($$select * from public.my_creator()$$, 'a user who is not a creator should get no creator');
select is_empty($$select * from billing.creators$$, 'another user should not see the creator''s row');
select is_empty(
  $$select * from billing.creator_earnings$$, 'another user should not see the creator''s earnings'
);
select is_empty($$select * from public.my_creator_payouts()$$, 'another user should see no payouts');
reset role;

-- Rules the tables keep -----------------------------------------------------------------------------
select throws_ok(
  $$update billing.creator_earnings set amount_microcents = 1$$,
  'TBAPP', null, 'creator earnings should be append-only, for the owner too'
);
select throws_ok(
  $$select * from public.upsert_listing('00000000-0000-0000-0000-0000000000d5', 'agent_nope', 'Nope', 500)$$,
  'TBLST', null, 'a user who is not a creator should not list'
);
update billing.creators set charges_enabled = false
where user_id = '00000000-0000-0000-0000-0000000000c5';
select throws_ok(
  $$select * from public.upsert_listing('00000000-0000-0000-0000-0000000000c5', 'agent_new', 'New', 500)$$,
  'TBLST', null, 'a creator without charges_enabled should not list'
);
select throws_ok(
  $$select * from public.quote_listing_sale('00000000-0000-0000-0000-0000000000d5', 'agent_priv')$$,
  'TBLST', null, 'an agent of a creator without charges_enabled should not be sold'
);
update billing.creators set charges_enabled = true
where user_id = '00000000-0000-0000-0000-0000000000c5';
select results_eq(
  $$select amount_cents, application_fee_cents, stripe_account_id
    from public.quote_listing_sale('00000000-0000-0000-0000-0000000000d5', 'agent_priv')$$,
  $$values (1999::bigint, 399::bigint, 'acct_1Priv'::text)$$,
  'the fee should be floor(1999 x 2000 / 10000) = 399, the rest to the creator''s account'
);
select throws_ok(
  $$insert into billing.marketplace_sales (
      id, product_code, buyer_id, creator_id, stripe_account_id, amount_cents, currency,
      commission_bps, application_fee_cents, livemode)
    values ('cs_test_badfee', 'agent_priv', '00000000-0000-0000-0000-0000000000d5',
      '00000000-0000-0000-0000-0000000000c5', 'acct_1Priv', 1999, 'usd', 2000, 400, false)$$,
  '23514', null, 'a sale whose fee is not floor(amount x commission / 10000) should be refused'
);

select * from finish();
rollback;
