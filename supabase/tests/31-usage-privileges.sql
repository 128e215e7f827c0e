-- The privilege matrix of rate cards, usage records and API keys: every new function and table
-- against anon, authenticated (owner and another user) and service_role; then the API key
-- functions' behaviour (create, authenticate, revoke, expiry, touch).
begin;
set local search_path = extensions, public;
select plan(48);

select tests.create_user('00000000-0000-0000-0000-0000000000a2', 'a2@example.com');
select tests.create_user('00000000-0000-0000-0000-0000000000b2', 'b2@example.com');
select status from public.record_usage(
    '00000000-0000-0000-0000-0000000000a2',
    '[{"meter": "agent.run", "quantity": 2}]', 'priv-usage-a'
  );

-- Functions: service_role only, but my_usage (authenticated) ---------------------------------
select is_empty(
  $$
    select f.signature || ' ' || r.rolname
    from (values
      ('public.quote_usage(uuid, jsonb, timestamptz)'),
      ('public.record_usage(uuid, jsonb, text, uuid)'),
      ('public.usage_summary(uuid, timestamptz, timestamptz, text)'),
      ('public.create_api_key(uuid, text, text[], timestamptz, text)'),
      ('public.list_api_keys(uuid)'),
      ('public.revoke_api_key(uuid, uuid)'),
      ('public.authenticate_api_key(text, timestamptz)'),
      ('public.touch_api_key(uuid)'),
      ('public.get_reservation(uuid)')
    ) as f (signature)
    cross join (values ('anon'), ('authenticated')) as r (rolname)
    where has_function_privilege(r.rolname, f.signature::regprocedure, 'execute')
  $$,
  'no usage or API key RPC should be executable by anon or authenticated'
);
select ok(
  (
    select bool_and(has_function_privilege('service_role', f.signature::regprocedure, 'execute'))
    from (
      values
      ('public.quote_usage(uuid, jsonb, timestamptz)'),
      ('public.record_usage(uuid, jsonb, text, uuid)'),
      ('public.usage_summary(uuid, timestamptz, timestamptz, text)'),
      ('public.create_api_key(uuid, text, text[], timestamptz, text)'),
      ('public.list_api_keys(uuid)'),
      ('public.revoke_api_key(uuid, uuid)'),
      ('public.authenticate_api_key(text, timestamptz)'),
      ('public.touch_api_key(uuid)'),
      ('public.get_reservation(uuid)')
    ) as f (signature)
  ),
  'service_role should execute every usage and API key RPC'
);
select function_privs_are(
  'public', 'my_usage', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'authenticated', array['EXECUTE'], 'authenticated should execute my_usage'
);
select function_privs_are(
  'public', 'my_usage', array['timestamp with time zone', 'timestamp with time zone', 'text'],
  'anon', array[]::text[], 'anon should not execute my_usage'
);
select ok(
  not (
    select p.prosecdef from pg_proc as p
    where p.oid = 'public.my_usage(timestamptz, timestamptz, text)'::regprocedure
  ),
  'my_usage should be security invoker (it reads through RLS)'
);

-- Tables ----------------------------------------------------------------------------------------
select table_privs_are('billing', 'meters', 'anon', array[]::text[], 'anon should not read meters');
select table_privs_are(
  'billing', 'meters', 'authenticated', array['SELECT'], 'authenticated should only read meters'
);
select table_privs_are(
  'billing', 'prices', 'authenticated', array['SELECT'], 'authenticated should only read prices (list ones, RLS)'
);
select table_privs_are(
  'billing', 'usage_records', 'authenticated', array['SELECT'],
  'authenticated should only read usage records (own ones, RLS)'
);
select table_privs_are(
  'billing', 'customer_terms', 'authenticated', array[]::text[], 'authenticated should not read customer terms'
);
select table_privs_are(
  'billing', 'api_keys', 'authenticated', array[]::text[], 'authenticated should not read API keys'
);
select table_privs_are('billing', 'api_keys', 'anon', array[]::text[], 'anon should not read API keys');
select table_privs_are(
  'billing', 'api_keys', 'service_role', array['SELECT'], 'service_role should only read API keys'
);
select table_privs_are(
  'billing', 'usage_records', 'service_role', array['SELECT'], 'service_role should only read usage records'
);
select table_privs_are(
  'billing', 'prices', 'service_role', array['SELECT'], 'service_role should only read prices'
);
select table_privs_are(
  'billing', 'customer_terms', 'service_role', array['SELECT'], 'service_role should only read customer terms'
);

select table_privs_are(
  'billing', 'usage_totals', 'authenticated', array[]::text[], 'authenticated should not read usage totals'
);
select table_privs_are(
  'billing', 'usage_totals', 'service_role', array['SELECT'], 'service_role should only read usage totals'
);

-- As anon -----------------------------------------------------------------------------------------
set local role anon;
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000000a2', '[{"meter": "agent.run",
    "quantity": 1}]', 'anon-u')$$,
  '42501', null, 'anon should not record usage'
);
select throws_ok(
  $$select * from public.create_api_key('00000000-0000-0000-0000-0000000000a2')$$,
  '42501', null, 'anon should not make API keys'
);
select throws_ok(
  $$select * from billing.usage_records$$, '42501', null, 'anon should not read usage records'
);
reset role;

-- As the owner ------------------------------------------------------------------------------------
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-0000000000a2", "role": "authenticated"}',
  true
);
set local role authenticated;
select results_eq(
  $$select count(*)::int from billing.usage_records$$, $$values (1)$$,
  'the owner should see the own usage record'
);
select is_empty($$select 1 from billing.prices where custom$$, 'a signed-in user should see no custom price');
select throws_ok(
  $$select * from public.quote_usage('00000000-0000-0000-0000-0000000000a2', '[{"meter": "agent.run",
    "quantity": 1}]')$$,
  '42501', null, 'a signed-in user should not call quote_usage'
);
select throws_ok(
  $$select * from public.record_usage('00000000-0000-0000-0000-0000000000a2', '[{"meter": "agent.run",
    "quantity": 1}]', 'self-u')$$,
  '42501', null, 'a signed-in user should not record usage (API keys go through the service)'
);
select throws_ok(
  $$select * from public.create_api_key('00000000-0000-0000-0000-0000000000a2')$$,
  '42501', null, 'a signed-in user should not make API keys in the database'
);
select throws_ok(
  $$insert into billing.usage_records (user_id, idempotency_key, line, meter_code, quantity, dimension_value,
    price_id, tokens)
    values ('00000000-0000-0000-0000-0000000000a2', 'forged', 1, 'agent.run', 1, '', 1, 0)$$,
  '42501', null, 'a signed-in user should not write usage records'
);
select throws_ok(
  $$insert into billing.prices (meter_code, scheme, unit_amount) values ('agent.run', 'per_unit', 0)$$,
  '42501', null, 'a signed-in user should not write prices'
);
select throws_ok(
  $$insert into billing.customer_terms (user_id, percent_off) values ('00000000-0000-0000-0000-0000000000a2', 100)$$,
  '42501', null, 'a signed-in user should not give themselves a discount'
);
reset role;

-- As another user ---------------------------------------------------------------------------------
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-0000000000b2", "role": "authenticated"}',
  true
);
set local role authenticated;
select is_empty(
  $$select 1 from billing.usage_records where user_id = '00000000-0000-0000-0000-0000000000a2'$$,
  'another user should not see the owner''s usage records'
);
select is_empty(
  $$select * from public.my_usage(now() - interval '1 day', now() + interval '1 day')$$,
  'another user''s my_usage should not show the owner''s usage'
);
reset role;

-- As service_role: API keys -------------------------------------------------------------------
set local role service_role;
create temporary table made on commit drop as
select * from public.create_api_key(
    '00000000-0000-0000-0000-0000000000a2', 'agent', array['usage:write', 'balance:read'], null, 'test'
  );
select ok(
  (select api_key ~ '^tb_test_[0-9a-f]{64}$' and status = 'applied' from made),
  'create_api_key should return a tb_test_ key once'
);
select is(
  (select k.secret_sha256 from billing.api_keys as k inner join made on k.id = made.api_key_id),
  (select sha256(convert_to(api_key, 'UTF8')) from made),
  'only the SHA-256 of the key should be stored'
);
select is_empty(
  $$select 1 from billing.api_keys as k join made on true
    where position(substr(made.api_key, 21) in k.lookup || coalesce(k.name, '')) > 0$$,
  'the secret part of the key should be stored nowhere'
);
select results_eq(
  $$select a.user_id, a.status, a.scopes from public.authenticate_api_key((select lookup from made)) as a$$,
  $$values ('00000000-0000-0000-0000-0000000000a2'::uuid, 'valid'::text, array['balance:read', 'usage:write'])$$,
  'authenticate_api_key should find the key by its lookup prefix'
);
select is_empty(
  $$select * from public.authenticate_api_key('tb_test_000000000000')$$,
  'an unknown lookup should find nothing'
);
select results_eq(
  $$select count(*)::int from public.touch_api_key((select api_key_id from made))$$, $$values (1)$$,
  'the first use should be recorded'
);
select results_eq(
  $$select count(*)::int from public.touch_api_key((select api_key_id from made))$$, $$values (0)$$,
  'a use less than a minute later should write nothing'
);
select results_eq(
  $$select status from public.authenticate_api_key((select lookup from made), now() + interval '1 year')$$,
  $$values ('valid'::text)$$, 'a key without an expiry should stay valid'
);
select results_eq(
  $$select status from public.revoke_api_key('00000000-0000-0000-0000-0000000000b2', (select api_key_id from made))$$,
  $$values ('not_found'::text)$$, 'another user should not revoke the key'
);
select results_eq(
  $$select status from public.revoke_api_key('00000000-0000-0000-0000-0000000000a2', (select api_key_id from made))$$,
  $$values ('applied'::text)$$, 'the owner should revoke the key'
);
select results_eq(
  $$select status from public.authenticate_api_key((select lookup from made))$$,
  $$values ('revoked'::text)$$, 'a revoked key should be revoked at once'
);
select results_eq(
  $$select status from public.revoke_api_key('00000000-0000-0000-0000-0000000000a2', (select api_key_id from made))$$,
  $$values ('duplicate'::text)$$, 'revoking twice should be a duplicate'
);
create temporary table made_expiring on commit drop as
select *
from public.create_api_key(
    '00000000-0000-0000-0000-0000000000a2', null, array['usage:read'], now() + interval '1 hour'
  );
select results_eq(
  $$select status from public.authenticate_api_key((select lookup from made_expiring), now() + interval '2 hours')$$,
  $$values ('expired'::text)$$, 'a key past its expiry should be expired'
);
select throws_ok(
  $$select * from public.create_api_key('00000000-0000-0000-0000-0000000000a2', null, array['admin'])$$,
  '22023', null, 'an unknown scope should be refused'
);
select results_eq(
  $$select status from public.create_api_key('00000000-0000-0000-0000-00000000ffff')$$,
  $$values ('unknown_account'::text)$$, 'a key for a user without an account should be unknown_account'
);
select throws_ok(
  $$update billing.api_keys set revoked_at = null$$, '42501', null, 'service_role should not un-revoke keys directly'
);
reset role;

select tests.invariants_hold('the books should balance');

select * from finish();
rollback;
