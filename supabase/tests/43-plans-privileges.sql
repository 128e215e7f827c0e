-- The privilege matrix of plans, prices, overage, auto top-up and notifications: every new
-- function and table against anon, authenticated (owner and another user) and service_role; then
-- the notifications Stripe events raise and the webhook outbox's claims and retries.
begin;
set local search_path = extensions, public;
set local timezone = 'UTC';
select plan(37);

select tests.create_user('00000000-0000-0000-0000-000000000431', 'n1@example.com');
select tests.create_user('00000000-0000-0000-0000-000000000432', 'n2@example.com');
select status from public.deduct_tokens('00000000-0000-0000-0000-000000000431', 90, 'priv-low');

-- Functions -------------------------------------------------------------------------------------
select is_empty(
  $$
    select f.signature || ' ' || r.rolname
    from (values
      ('public.check_entitlement(uuid, text, timestamptz)'),
      ('public.check_limit(uuid, text, bigint, timestamptz)'),
      ('public.list_product_prices(boolean)'),
      ('public.set_product_price(text, text, text, bigint, text)'),
      ('public.grant_scheduled_tokens(timestamptz)'),
      ('public.claim_notification_deliveries(integer, interval, timestamptz)'),
      ('public.complete_notification_delivery(uuid, boolean, text, integer)'),
      ('public.claim_auto_top_ups(integer, interval, timestamptz)'),
      ('public.finish_auto_top_up(uuid, text, jsonb, text)'),
      ('public.set_auto_top_up(uuid, boolean, text)'),
      ('public.postpaid_due(timestamptz)'),
      ('public.mark_postpaid_invoiced(uuid, timestamptz, text)'),
      ('public.deduct_tokens(uuid, bigint, text, text, jsonb)')
    ) as f (signature)
    cross join (values ('anon'), ('authenticated')) as r (rolname)
    where has_function_privilege(r.rolname, f.signature::regprocedure, 'execute')
  $$,
  'no plan, price, overage, top-up or notification RPC should be executable by anon or authenticated'
);
select ok(
  (
    select bool_and(has_function_privilege('service_role', f.signature::regprocedure, 'execute'))
    from (
      values
      ('public.check_entitlement(uuid, text, timestamptz)'),
      ('public.check_limit(uuid, text, bigint, timestamptz)'),
      ('public.list_product_prices(boolean)'),
      ('public.set_product_price(text, text, text, bigint, text)'),
      ('public.grant_scheduled_tokens(timestamptz)'),
      ('public.claim_notification_deliveries(integer, interval, timestamptz)'),
      ('public.complete_notification_delivery(uuid, boolean, text, integer)'),
      ('public.claim_auto_top_ups(integer, interval, timestamptz)'),
      ('public.finish_auto_top_up(uuid, text, jsonb, text)'),
      ('public.set_auto_top_up(uuid, boolean, text)'),
      ('public.postpaid_due(timestamptz)'),
      ('public.mark_postpaid_invoiced(uuid, timestamptz, text)'),
      ('public.deduct_tokens(uuid, bigint, text, text, jsonb)')
    ) as f (signature)
  ),
  'service_role should execute every plan, price, overage, top-up and notification RPC'
);
select function_privs_are(
  'public', 'my_entitlements', array['timestamp with time zone'],
  'authenticated', array['EXECUTE'], 'authenticated should execute my_entitlements'
);
select function_privs_are(
  'public', 'my_entitlements', array['timestamp with time zone'],
  'anon', array[]::text[], 'anon should not execute my_entitlements'
);
select function_privs_are(
  'public', 'my_entitlements', array['timestamp with time zone'],
  'service_role', array[]::text[], 'service_role should not execute my_entitlements (the browser''s)'
);
select is_empty(
  $$
    select p.oid::regprocedure::text || ' ' || r.rolname
    from pg_proc as p
    join pg_namespace as n on n.oid = p.pronamespace
    cross join (values ('anon'), ('authenticated'), ('service_role')) as r (rolname)
    where n.nspname = 'billing' and p.proname in (
        'tg_accounts__past_due_since', 'plan_of_price', 'price_interval', 'notify',
        'tg_stripe_events__notify', 'plan_alert_levels', 'tg_accounts__alert_levels',
        'tg_products__alert_levels', 'usage_period_start', 'note_crossings', 'debit_overage')
      and has_function_privilege(r.rolname, p.oid, 'execute')
  $$,
  'the private helpers should be executable by none of the API roles'
);

-- Tables ----------------------------------------------------------------------------------------
select table_privs_are(
  'billing', 'notifications', 'authenticated', array['SELECT'],
  'authenticated should only select billing.notifications (through RLS)'
);
select table_privs_are(
  'billing', 'notifications', 'service_role', array['SELECT'],
  'service_role should only select billing.notifications'
);
select table_privs_are(
  'billing', 'product_prices', 'authenticated', array['SELECT'],
  'authenticated should only select billing.product_prices (the active ones, for pricing cards)'
);
select table_privs_are(
  'billing', 'product_prices', 'service_role', array['SELECT'],
  'service_role should only select billing.product_prices'
);
select is_empty(
  $$
    select t.name || ' ' || r.rolname
    from (values ('notification_deliveries'), ('scheduled_grants'), ('overage_periods'),
      ('auto_top_up_preferences'), ('auto_top_ups')) as t (name)
    cross join (values ('anon'), ('authenticated')) as r (rolname)
    where has_table_privilege(r.rolname, ('billing.' || t.name)::regclass, 'SELECT')
  $$,
  'the service-only tables should not be readable by anon or authenticated'
);
select ok(
  (
    select
      bool_and(
        has_table_privilege('service_role', ('billing.' || t.name)::regclass, 'SELECT')
        and not has_table_privilege('service_role', ('billing.' || t.name)::regclass, 'INSERT, UPDATE, DELETE')
      )
    from (
      values ('notification_deliveries'), ('scheduled_grants'), ('overage_periods'),
      ('auto_top_up_preferences'), ('auto_top_ups')
    ) as t (name)
  ),
  'service_role should only select the service-only tables'
);
select ok(
  (
    select bool_and(c.relrowsecurity)
    from pg_class as c inner join pg_namespace as n on c.relnamespace = n.oid
    where n.nspname = 'billing' and c.relname in (
        'notifications', 'notification_deliveries',
        'product_prices', 'scheduled_grants', 'overage_periods', 'auto_top_up_preferences', 'auto_top_ups'
      )
  ),
  'every new table should have RLS on'
);

-- Behaviour as anon and as signed-in users -----------------------------------------------------------
set local role anon;
select throws_ok(
  $$select * from billing.notifications$$, '42501', null, 'anon should not read notifications'
);
select throws_ok(
  $$select * from public.claim_notification_deliveries()$$, '42501', null,
  'anon should not claim webhook deliveries'
);
reset role;
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-000000000431", "role": "authenticated"}', true
);
set local role authenticated;
select results_eq(
  $$select kind, user_id from billing.notifications$$,
  $$values ('low_balance'::text, '00000000-0000-0000-0000-000000000431'::uuid)$$,
  'the owner should read the own low_balance notification'
);
select throws_ok(
  $$insert into billing.notifications (user_id, kind, message, dedup_key)
    values ('00000000-0000-0000-0000-000000000431', 'low_balance', 'forged', 'forged')$$,
  '42501', null, 'the owner should not write notifications'
);
select throws_ok(
  $$select * from billing.notification_deliveries$$, '42501', null,
  'a signed-in user should not read the webhook outbox'
);
select throws_ok(
  $$select * from public.finish_auto_top_up(gen_random_uuid(), 'succeeded', '{"id": "pi_forged"}')$$,
  '42501', null, 'a signed-in user should not report an auto top-up'
);
reset role;
select set_config(
  'request.jwt.claims',
  '{"sub": "00000000-0000-0000-0000-000000000432", "role": "authenticated"}', true
);
set local role authenticated;
select is_empty(
  $$select 1 from billing.notifications where user_id = '00000000-0000-0000-0000-000000000431'$$,
  'another user should not see the owner''s notifications'
);
reset role;

-- The outbox: claims, leases, retries with backoff, delivered once --------------------------------------
set local role service_role;
select results_eq(
  $$select kind, attempts from public.claim_notification_deliveries(10, '1 minute')$$,
  $$values ('low_balance'::text, 1)$$,
  'the worker should claim the pending delivery'
);
select is_empty(
  $$select * from public.claim_notification_deliveries(10, '1 minute')$$,
  'a claimed delivery should not be claimed again within its lease'
);
select results_eq(
  $$select status, next_attempt_at > now() + interval '9 seconds'
    from public.complete_notification_delivery(
      (select id from billing.notifications where user_id = '00000000-0000-0000-0000-000000000431'),
      false, 'HTTP 500')$$,
  $$values ('pending'::text, true)$$,
  'a failed attempt should stay pending and be retried after a backoff (10 s)'
);
select is_empty(
  $$select * from public.claim_notification_deliveries(10, '1 minute')$$,
  'a failed delivery should not be retried before its backoff'
);
select results_eq(
  $$select attempts from public.claim_notification_deliveries(10, '1 minute', now() + interval '11 seconds')$$,
  $$values (2)$$,
  'after the backoff it should be claimed again'
);
select results_eq(
  $$select status from public.complete_notification_delivery(
      (select id from billing.notifications where user_id = '00000000-0000-0000-0000-000000000431'), true)$$,
  $$values ('delivered'::text)$$,
  'a 2xx should mark it delivered'
);
select is_empty(
  $$select * from public.claim_notification_deliveries(10, '1 minute', now() + interval '2 hours')$$,
  'a delivered notification should never be claimed again'
);
select results_eq(
  $$select status from public.complete_notification_delivery(
      (select id from billing.notifications where user_id = '00000000-0000-0000-0000-000000000431'), false, 'late')$$,
  $$values ('delivered'::text)$$,
  'a late failure report should not undo a delivery'
);
select throws_ok(
  $$select * from public.claim_notification_deliveries(0)$$, '22023', null, 'p_limit 0 should raise 22023'
);
reset role;

-- Stripe events raise notifications once: a failed payment, a cancellation ----------------------------
update billing.products set stripe_price_id = 'price_1234'
where code = 'pro';
select public.link_stripe_customer('00000000-0000-0000-0000-000000000432', 'cus_1234');
set local role service_role;
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json',
    'evt_43_sub', 'customer.subscription.created', 1700200000,
    '{"id": "sub_1234", "customer": "cus_1234", "items": {"data": [{"price": {"id": "price_1234"}}]}}'))$$,
  $$values ('applied'::text)$$,
  'the pro subscription should be recorded'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/invoice.payment_failed.json', 'evt_43_failed', 'invoice.payment_failed', 1700200100))$$,
  $$values ('applied'::text)$$,
  'invoice.payment_failed should be applied'
);
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'pay-rails-stripe/invoice.payment_failed.json', 'evt_43_failed', 'invoice.payment_failed', 1700200100))$$,
  $$values ('duplicate'::text)$$,
  'its redelivery should answer duplicate'
);
reset role;
select results_eq(
  $$select kind, data ->> 'stripe_event_id' from billing.notifications
    where user_id = '00000000-0000-0000-0000-000000000432'$$,
  $$values ('payment_failed'::text, 'evt_43_failed'::text)$$,
  'a failed payment should raise one payment_failed notification, redelivery or not'
);
select is(
  (
    select past_due_since from billing.accounts
    where user_id = '00000000-0000-0000-0000-000000000432'
  ),
  to_timestamp(1700200100), 'the grace period should start at the failure''s Stripe time'
);
set local role service_role;
select results_eq(
  $$select status from public.handle_stripe_event(tests.stripe_event(
    'stripe-ruby-mock-webhook_fixtures/customer.subscription.deleted.json',
    'evt_43_deleted', 'customer.subscription.deleted', 1700200200,
    '{"id": "sub_1234", "customer": "cus_1234", "items": {"data": [{"price": {"id": "price_1234"}}]}}'))$$,
  $$values ('applied'::text)$$,
  'customer.subscription.deleted should be applied'
);
reset role;
select results_eq(
  $$select kind from billing.notifications where user_id = '00000000-0000-0000-0000-000000000432'
    order by created_at, kind$$,
  $$values ('payment_failed'::text), ('subscription_canceled'::text)$$,
  'a cancellation should raise subscription_canceled'
);
select tests.invariants_hold('the books should balance after the notifications');

select * from finish();
rollback;
