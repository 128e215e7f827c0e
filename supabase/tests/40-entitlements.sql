-- Entitlements: a plan's limits and features, through every subscription state and the past_due
-- grace period (explicit as_of), for the user (my_entitlements, RLS) and the service
-- (check_entitlement, check_limit).
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(43);

select tests.create_user('00000000-0000-0000-0000-000000000401', 'ent@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000402', 'other@example.com');

-- The free plan (every account starts on it) ----------------------------------------------------
select results_eq(
  $$select allowed, entitled_plan from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'basic')$$,
  $$values (true, 'free'::text)$$,
  'a free account should have the free plan''s basic feature'
);
select results_eq(
  $$select allowed, entitled_plan, detail from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'api_access')$$,
  $$values (false, 'free'::text, 'free lacks api_access'::text)$$,
  'a free account should lack api_access'
);
select results_eq(
  $$select allowed, max_value from public.check_limit('00000000-0000-0000-0000-000000000401', 'max_agents', 0)$$,
  $$values (true, 1::bigint)$$,
  'a free account with no agent should be allowed its first (max_agents 1)'
);
select results_eq(
  $$select allowed, max_value, detail from public.check_limit(
    '00000000-0000-0000-0000-000000000401', 'max_agents', 1)$$,
  $$values (false, 1::bigint, 'free: max_agents 1 of 1'::text)$$,
  'a free account with one agent should be refused a second'
);
select results_eq(
  $$select allowed, max_value from public.check_limit('00000000-0000-0000-0000-000000000401', 'max_seats', 0)$$,
  $$values (false, null::bigint)$$,
  'a limit the plan does not name should allow nothing'
);

-- Active and trialing: the plan's own --------------------------------------------------------------
update billing.accounts set plan = 'pro', subscription_status = 'active'
where user_id = '00000000-0000-0000-0000-000000000401';
select results_eq(
  $$select allowed, entitled_plan from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'api_access')$$,
  $$values (true, 'pro'::text)$$,
  'an active pro subscriber should have api_access'
);
select results_eq(
  $$select allowed from public.check_limit('00000000-0000-0000-0000-000000000401', 'max_agents', 9)
    union all
    select allowed from public.check_limit('00000000-0000-0000-0000-000000000401', 'max_agents', 10)$$,
  $$values (true), (false)$$,
  'pro should allow a 10th agent and refuse an 11th (at the boundary)'
);
update billing.accounts set subscription_status = 'trialing'
where user_id = '00000000-0000-0000-0000-000000000401';
select results_eq(
  $$select allowed, entitled_plan from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'custom_agents')$$,
  $$values (true, 'pro'::text)$$,
  'a trialing pro subscriber should have the plan''s features'
);

-- past_due: the grace period, from the subscription's past_due event -------------------------------
insert into billing.subscriptions (
  id, user_id, product_code, status, current_period_start, current_period_end, last_event_id,
  last_event_created
)
values (
  'sub_ent401', '00000000-0000-0000-0000-000000000401', 'pro', 'past_due', '2026-11-01', '2026-12-01',
  'evt_ent401', '2026-11-20 10:00:00+00'
);
update billing.accounts set subscription_status = 'past_due'
where user_id = '00000000-0000-0000-0000-000000000401';
select is(
  (
    select past_due_since from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000401'
  ),
  '2026-11-20 10:00:00+00'::timestamptz,
  'past_due_since should be the past_due subscription''s Stripe event time'
);
select results_eq(
  $$select allowed, entitled_plan from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'api_access', '2026-11-21 00:00:00+00')$$,
  $$values (true, 'pro'::text)$$,
  'past_due within the grace period (7 days) should keep the plan''s features'
);
select results_eq(
  $$select allowed, entitled_plan from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'api_access', '2026-11-27 09:59:59+00')$$,
  $$values (true, 'pro'::text)$$,
  'past_due one second before the grace period ends should keep them'
);
select results_eq(
  $$select allowed, entitled_plan, detail from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'api_access', '2026-11-27 10:00:00+00')$$,
  $$values (false, 'free'::text, 'free lacks api_access (plan pro is past_due)'::text)$$,
  'past_due when the grace period ends should fall back to the free plan'
);
select results_eq(
  $$select allowed, max_value from public.check_limit(
    '00000000-0000-0000-0000-000000000401', 'max_agents', 1, '2026-12-01 00:00:00+00')$$,
  $$values (false, 1::bigint)$$,
  'after the grace period the free plan''s limits should apply'
);
update billing.products set grace_period = '1 day'
where code = 'pro';
select results_eq(
  $$select entitled_plan from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'api_access', '2026-11-21 10:00:00+00')$$,
  $$values ('free'::text)$$,
  'the grace period should be the plan''s to configure (1 day: over after a day)'
);
update billing.products set grace_period = '7 days'
where code = 'pro';

-- Paid again: the plan's, the grace clock cleared ---------------------------------------------------
update billing.accounts set subscription_status = 'active'
where user_id = '00000000-0000-0000-0000-000000000401';
select is(
  (
    select past_due_since from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000401'
  ),
  null::timestamptz,
  'leaving past_due should clear past_due_since'
);
select results_eq(
  $$select entitled_plan from public.check_entitlement(
    '00000000-0000-0000-0000-000000000401', 'api_access', '2027-01-01 00:00:00+00')$$,
  $$values ('pro'::text)$$,
  'an active subscription should entitle whatever as_of says'
);

-- Every other status: the free plan's ------------------------------------------------------------
create function pg_temp.entitled_in(p_status text) returns text
language sql
as $$
  update billing.accounts set subscription_status = p_status
  where user_id = '00000000-0000-0000-0000-000000000401';
  select entitled_plan from public.check_entitlement('00000000-0000-0000-0000-000000000401', 'basic');
$$;
select is(pg_temp.entitled_in('canceled'), 'free', 'canceled should entitle the free plan');
select is(pg_temp.entitled_in('unpaid'), 'free', 'unpaid should entitle the free plan');
select is(pg_temp.entitled_in('paused'), 'free', 'paused should entitle the free plan');
select is(pg_temp.entitled_in('incomplete'), 'free', 'incomplete should entitle the free plan');
select is(
  pg_temp.entitled_in('incomplete_expired'), 'free', 'incomplete_expired should entitle the free plan'
);
select is(pg_temp.entitled_in('active'), 'pro', 'active again should entitle pro');

-- A plan given without Stripe (status none): Enterprise, unlimited agents ------------------------
update billing.accounts set plan = 'enterprise', subscription_status = 'none'
where user_id = '00000000-0000-0000-0000-000000000401';
select results_eq(
  $$select allowed, max_value, detail from public.check_limit(
    '00000000-0000-0000-0000-000000000401', 'max_agents', 1000000)$$,
  $$values (true, null::bigint, 'enterprise: max_agents unlimited'::text)$$,
  'a null limit should be unlimited'
);
select results_eq(
  $$select allowed from public.check_entitlement('00000000-0000-0000-0000-000000000401', 'custom_sla')$$,
  $$values (true)$$,
  'a plan given without Stripe (status none) should entitle its features'
);

-- Host-defined keys ----------------------------------------------------------------------------
update billing.products set limits = limits || '{"max_exports": 2.9}', features = features || '{beta}'
where code = 'enterprise';
select results_eq(
  $$select allowed, max_value from public.check_limit('00000000-0000-0000-0000-000000000401', 'max_exports', 2)$$,
  $$values (false, 2::bigint)$$,
  'a host-defined limit should count, rounded down'
);
select results_eq(
  $$select allowed from public.check_entitlement('00000000-0000-0000-0000-000000000401', 'beta')$$,
  $$values (true)$$,
  'a host-defined feature should be checkable'
);
select throws_ok(
  $$update billing.products set limits = '{"max_agents": "ten"}' where code = 'starter'$$,
  '23514', null, 'a limit that is not a number or null should be refused'
);

-- Bad input and unknown accounts ------------------------------------------------------------------
select results_eq(
  $$select allowed, entitled_plan, detail from public.check_entitlement(
    '00000000-0000-0000-0000-0000000004ff', 'basic')$$,
  $$values (false, null::text, 'unknown_account'::text)$$,
  'an unknown account should be entitled to nothing'
);
select results_eq(
  $$select allowed, detail from public.check_limit('00000000-0000-0000-0000-0000000004ff', 'max_agents', 0)$$,
  $$values (false, 'unknown_account'::text)$$,
  'an unknown account should be allowed no limit'
);
select throws_ok(
  $$select * from public.check_entitlement('00000000-0000-0000-0000-000000000401', ' ')$$,
  '22023', null, 'a blank feature key should raise 22023'
);
select throws_ok(
  $$select * from public.check_limit('00000000-0000-0000-0000-000000000401', 'max_agents', -1)$$,
  '22023', null, 'a negative count should raise 22023'
);
select throws_ok(
  $$select * from public.check_limit('00000000-0000-0000-0000-000000000401', null, 1)$$,
  '22023', null, 'a null limit key should raise 22023'
);

-- The user's view: my_entitlements, through RLS ----------------------------------------------------
update billing.accounts set plan = 'pro', subscription_status = 'past_due'
where user_id = '00000000-0000-0000-0000-000000000401';
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-000000000401", "role": "authenticated"}', true
);
set local role authenticated;
select results_eq(
  $$select plan, subscription_status, entitled_plan, limits, features, grace_until, period_tokens
    from public.my_entitlements('2026-11-22 00:00:00+00')$$,
  $$values ('pro'::text, 'past_due'::text, 'pro'::text, '{"max_agents": 10}'::jsonb,
    '{basic,file_upload,export,api_access,custom_agents}'::text[], '2026-11-27 10:00:00+00'::timestamptz,
    25000::bigint)$$,
  'my_entitlements should show the own plan, its entitlements and when the grace period ends'
);
select results_eq(
  $$select entitled_plan, limits from public.my_entitlements('2026-12-24 00:00:00+00')$$,
  $$values ('free'::text, '{"max_agents": 1}'::jsonb)$$,
  'my_entitlements after the grace period should show the free plan''s'
);
select results_eq(
  $$select count(*)::int from public.my_entitlements()$$,
  $$values (1)$$,
  'my_entitlements should answer with the caller''s defaults (now) too'
);
select throws_ok(
  $$select * from public.check_entitlement('00000000-0000-0000-0000-000000000401', 'api_access')$$,
  '42501', null, 'a signed-in user should not call check_entitlement'
);
select throws_ok(
  $$select * from public.check_limit('00000000-0000-0000-0000-000000000401', 'max_agents', 0)$$,
  '42501', null, 'a signed-in user should not call check_limit'
);
reset role;
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-000000000402", "role": "authenticated"}', true
);
set local role authenticated;
select results_eq(
  $$select plan, entitled_plan from public.my_entitlements()$$,
  $$values ('free'::text, 'free'::text)$$,
  'another user should see only their own entitlements'
);
reset role;
set local role anon;
select throws_ok(
  $$select * from public.my_entitlements()$$,
  '42501', null, 'anon should not call my_entitlements'
);
reset role;

-- The service role calls the checks, not the browser's function ----------------------------------
set local role service_role;
select results_eq(
  $$select allowed from public.check_limit('00000000-0000-0000-0000-000000000402', 'max_agents', 0)$$,
  $$values (true)$$,
  'service_role should call check_limit'
);
select results_eq(
  $$select allowed from public.check_entitlement('00000000-0000-0000-0000-000000000402', 'basic')$$,
  $$values (true)$$,
  'service_role should call check_entitlement'
);
select throws_ok(
  $$select * from public.my_entitlements()$$,
  '42501', null, 'service_role should not call my_entitlements (it is the browser''s)'
);
reset role;
select tests.invariants_hold('the books should balance after the entitlement checks');

select * from finish();
rollback;
