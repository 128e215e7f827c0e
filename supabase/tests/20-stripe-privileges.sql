-- Stripe records and RPCs: shape, the privilege matrix, the seeded catalog and
-- link_stripe_customer. Privileges before behaviour.
begin;
set local search_path = extensions, public;
select plan(53);

select tests.create_user('00000000-0000-0000-0000-000000000201', 'link-a@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000202', 'link-b@example.com');

-- Shape -----------------------------------------------------------------------------------------
select has_table('billing', 'customers', 'billing.customers should exist');
select has_table('billing', 'subscriptions', 'billing.subscriptions should exist');
select has_table('billing', 'stripe_events', 'billing.stripe_events should exist');
select has_table('billing', 'stripe_payments', 'billing.stripe_payments should exist');
select has_table('billing', 'stripe_refunds', 'billing.stripe_refunds should exist');
select has_table('billing', 'stripe_disputes', 'billing.stripe_disputes should exist');
select columns_are('billing', 'stripe_events', array[
  'id', 'type', 'api_version', 'created', 'livemode', 'payload', 'received_at', 'status', 'detail',
  'attempts', 'processed_at', 'waiting_for'
], 'billing.stripe_events should have exactly the inbox columns');
select has_table('billing', 'stripe_sales', 'billing.stripe_sales should exist');
select has_table(
  'billing', 'stripe_invoice_payments', 'billing.stripe_invoice_payments should exist'
);
select col_is_pk('billing', 'stripe_events', 'id', 'the Stripe event id should be the primary key');
select col_is_pk(
  'billing', 'customers', 'stripe_customer_id',
  'a Stripe customer should be linked at most once (its id is the primary key)'
);
select has_function(
  'public', 'handle_stripe_event', array['jsonb'],
  'public.handle_stripe_event(jsonb) should exist'
);
select has_function(
  'public', 'replay_parked_stripe_events', array[]::text[],
  'public.replay_parked_stripe_events() should exist'
);
select has_function(
  'public', 'link_stripe_customer', array['uuid', 'text'],
  'public.link_stripe_customer(uuid, text) should exist'
);
select has_function(
  'public', 'record_checkout_session', array['jsonb'],
  'public.record_checkout_session(jsonb) should exist'
);
select has_function(
  'public', 'record_payment_intent', array['jsonb'],
  'public.record_payment_intent(jsonb) should exist'
);
select is_definer(
  'public', 'record_checkout_session', array['jsonb'],
  'record_checkout_session should be security definer'
);
select is_definer(
  'public', 'record_payment_intent', array['jsonb'],
  'record_payment_intent should be security definer'
);
select is_definer(
  'public', 'handle_stripe_event', array['jsonb'],
  'handle_stripe_event should be security definer'
);
select is_definer(
  'public', 'replay_parked_stripe_events', array[]::text[],
  'replay_parked_stripe_events should be security definer'
);
select is_definer(
  'public', 'link_stripe_customer', array['uuid', 'text'],
  'link_stripe_customer should be security definer'
);
select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace
    where n.nspname in ('public', 'billing')
      and p.proname in ('handle_stripe_event', 'replay_parked_stripe_events', 'link_stripe_customer',
        'record_checkout_session', 'record_payment_intent')
      and not coalesce(p.proconfig @> array['search_path=""'], false)
  $$,
  'the Stripe RPCs should pin an empty search_path'
);
select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace
    where n.nspname = 'billing' and p.prosecdef
      and (p.proname like 'apply_%' or p.proname like '%stripe%' or p.proname like '%customer%')
  $$,
  'the handler''s helpers in billing should be security invoker'
);

-- Privileges ------------------------------------------------------------------------------------
select ok(
  not (
    has_function_privilege('anon', 'public.record_checkout_session(jsonb)', 'execute')
    or has_function_privilege('authenticated', 'public.record_checkout_session(jsonb)', 'execute')
  ),
  'neither anon nor authenticated should execute record_checkout_session'
);
select ok(
  has_function_privilege('service_role', 'public.record_checkout_session(jsonb)', 'execute'),
  'service_role should execute record_checkout_session'
);
select ok(
  not (
    has_function_privilege('anon', 'public.record_payment_intent(jsonb)', 'execute')
    or has_function_privilege('authenticated', 'public.record_payment_intent(jsonb)', 'execute')
  ),
  'neither anon nor authenticated should execute record_payment_intent'
);
select ok(
  has_function_privilege('service_role', 'public.record_payment_intent(jsonb)', 'execute'),
  'service_role should execute record_payment_intent'
);
select ok(
  not has_function_privilege('anon', 'public.handle_stripe_event(jsonb)', 'execute'),
  'anon should not execute handle_stripe_event'
);
select ok(
  not has_function_privilege('authenticated', 'public.handle_stripe_event(jsonb)', 'execute'),
  'authenticated should not execute handle_stripe_event'
);
select ok(
  has_function_privilege('service_role', 'public.handle_stripe_event(jsonb)', 'execute'),
  'service_role should execute handle_stripe_event'
);
select ok(
  not has_function_privilege('anon', 'public.replay_parked_stripe_events()', 'execute'),
  'anon should not execute replay_parked_stripe_events'
);
select ok(
  not has_function_privilege('authenticated', 'public.replay_parked_stripe_events()', 'execute'),
  'authenticated should not execute replay_parked_stripe_events'
);
select ok(
  has_function_privilege('service_role', 'public.replay_parked_stripe_events()', 'execute'),
  'service_role should execute replay_parked_stripe_events'
);
select ok(
  not has_function_privilege('anon', 'public.link_stripe_customer(uuid, text)', 'execute'),
  'anon should not execute link_stripe_customer'
);
select ok(
  not has_function_privilege('authenticated', 'public.link_stripe_customer(uuid, text)', 'execute'),
  'authenticated should not execute link_stripe_customer'
);
select ok(
  has_function_privilege('service_role', 'public.link_stripe_customer(uuid, text)', 'execute'),
  'service_role should execute link_stripe_customer'
);
select is_empty(
  $$
    select c.relname
    from pg_class as c join pg_namespace as n on n.oid = c.relnamespace
    where n.nspname = 'billing'
      and c.relname in ('customers', 'subscriptions', 'stripe_events', 'stripe_payments',
        'stripe_refunds', 'stripe_disputes', 'stripe_sales', 'stripe_invoice_payments')
      and (not c.relrowsecurity
        or exists (select 1 from pg_policy as p where p.polrelid = c.oid))
  $$,
  'every Stripe table should have RLS enabled and no policy (service role only)'
);
select is_empty(
  $$
    select c.relname || ' ' || r.rolname
    from pg_class as c
    join pg_namespace as n on n.oid = c.relnamespace
    cross join (values ('anon'), ('authenticated')) as r (rolname)
    where n.nspname = 'billing'
      and c.relname in ('customers', 'subscriptions', 'stripe_events', 'stripe_payments',
        'stripe_refunds', 'stripe_disputes', 'stripe_sales', 'stripe_invoice_payments')
      and has_table_privilege(r.rolname, c.oid, 'SELECT')
  $$,
  'neither anon nor authenticated should read any Stripe table'
);

set local role anon;
select throws_ok(
  $$select * from public.handle_stripe_event('{"id": "evt_anon"}')$$,
  '42501', null, 'anon should be refused handle_stripe_event'
);
select throws_ok(
  $$select * from public.link_stripe_customer('00000000-0000-0000-0000-000000000201', 'cus_anon')$$,
  '42501', null, 'anon should be refused link_stripe_customer'
);
reset role;

select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-000000000201", "role": "authenticated"}', true
);
set local role authenticated;
select throws_ok(
  $$select * from public.replay_parked_stripe_events()$$,
  '42501', null, 'a signed-in user should be refused replay_parked_stripe_events'
);
select throws_ok(
  $$select * from public.link_stripe_customer('00000000-0000-0000-0000-000000000201', 'cus_self')$$,
  '42501', null, 'a signed-in user should not link a customer to themselves'
);
reset role;

-- The seeded catalog ----------------------------------------------------------------------------
select results_eq(
  $$select code, kind, tokens, price_cents, rollover from billing.products
    where code in ('pack_100', 'pack_250', 'pack_600', 'free', 'starter', 'pro')
    order by kind, price_cents$$,
  $$values
    ('pack_100'::text, 'pack'::text, 100::bigint, 500, false),
    ('pack_250', 'pack', 250, 1000, false),
    ('pack_600', 'pack', 600, 2000, false),
    ('free', 'plan', 100, 0, false),
    ('starter', 'plan', 5000, 2900, false),
    ('pro', 'plan', 25000, 9900, false)$$,
  'seed.sql should provide the contract''s packs and plans'
);

-- link_stripe_customer --------------------------------------------------------------------------
set local role service_role;
select results_eq(
  $$select status from public.link_stripe_customer(
    '00000000-0000-0000-0000-000000000201', 'cus_Link0000000001')$$,
  $$values ('applied'::text)$$,
  'linking a new customer should answer applied'
);
select results_eq(
  $$select status from public.link_stripe_customer(
    '00000000-0000-0000-0000-000000000201', 'cus_Link0000000001')$$,
  $$values ('duplicate'::text)$$,
  'linking it again to the same user should answer duplicate'
);
select throws_ok(
  $$select * from public.link_stripe_customer(
    '00000000-0000-0000-0000-000000000202', 'cus_Link0000000001')$$,
  'TBCUS',
  'Stripe customer cus_Link0000000001 is already linked to user '
  '00000000-0000-0000-0000-000000000201, not 00000000-0000-0000-0000-000000000202',
  'linking a customer of another user should raise TBCUS naming both users'
);
select results_eq(
  $$select status from public.link_stripe_customer(
    '00000000-0000-0000-0000-000000000201', 'cus_Link0000000002')$$,
  $$values ('applied'::text)$$,
  'a user should be able to own a second customer'
);
select throws_ok(
  $$select * from public.link_stripe_customer(null, 'cus_Link0000000003')$$,
  '22023', 'p_user_id must not be null', 'a null user should raise 22023'
);
select throws_ok(
  $$select * from public.link_stripe_customer('00000000-0000-0000-0000-000000000201', 'acct_1')$$,
  '22023', 'p_stripe_customer_id must be a Stripe customer id (cus_...), got ''acct_1''',
  'something other than a customer id should raise 22023 naming the argument'
);
select results_eq(
  $$select status from public.link_stripe_customer(
    '00000000-0000-0000-0000-000000000209', 'cus_Link0000000009')$$,
  $$values ('applied'::text)$$,
  'linking a customer to a user without an account should answer applied'
);
reset role;

select results_eq(
  $$select stripe_customer_id, user_id from billing.customers
    where stripe_customer_id like 'cus_Link%' order by 1$$,
  $$values
    ('cus_Link0000000001'::text, '00000000-0000-0000-0000-000000000201'::uuid),
    ('cus_Link0000000002', '00000000-0000-0000-0000-000000000201'),
    ('cus_Link0000000009', '00000000-0000-0000-0000-000000000209')$$,
  'only the applied links should be stored, the refused one not at all'
);
select is(
  tests.balance('00000000-0000-0000-0000-000000000209'), 100::bigint,
  'the user of a linked customer should get an account with the signup grant'
);
select tests.invariants_hold('the ledger invariants should hold after the privilege matrix');

select * from finish();
rollback;
